import math

import pytest
import torch

from robustkd.data import Batch
from robustkd.methods import DataInfo, create_objective
from robustkd.methods.crdnd import compensation_matrix, nt_xent


def test_compensation_matrix_columns_are_the_teacher_confusions():
    m = compensation_matrix(torch.tensor([0.9, 0.5, 1.0]))
    assert torch.allclose(m.sum(0), torch.ones(3))                # every column sums to 1
    assert torch.allclose(m[:, 0], torch.tensor([0.9, 0.05, 0.05]))
    assert torch.allclose(m[:, 2], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(compensation_matrix(torch.ones(4)), torch.eye(4))


def test_nt_xent_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    z = [v / v.norm() for v in torch.cat([s, t])]
    total = 0.0
    for i in range(4):
        pos = (i + 2) % 4
        num = math.exp(float(z[i] @ z[pos]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(4) if k != i)
        total += -math.log(num / den)
    assert nt_xent(s, t, tau).item() == pytest.approx(total / 4, rel=1e-6)


def test_crdnd_runs_and_learns_the_teacher_accuracy(small_models, tiny_batch):
    student, teacher = small_models
    x, y, *_ = tiny_batch
    obj = create_objective("crdnd", {"steps": 1}, data=DataInfo(10, torch.arange(6)))
    loss, parts = obj(student, teacher, Batch(x, y))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"contrast_nat", "contrast_adv"}
    acc = obj.state.accuracy("nat")
    with torch.no_grad():
        pred = teacher(x).argmax(1)
    for c in range(6):                                  # one image per class: 0 or 1
        assert acc[c].item() == float(pred[c] == c)
    assert (acc[6:] == 1).all()                         # unseen classes: identity
