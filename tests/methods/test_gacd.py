import math

import pytest
import torch

from robustkd.data import Batch
from robustkd.methods import DataInfo, create_objective
from robustkd.methods.gacd import nce_loss_per_sample
from robustkd.models import create_model


def make(labels, **settings):
    s, t = create_model("resnet10_w8"), create_model("resnet10_w8")
    info = DataInfo(10, torch.as_tensor(labels), s.feature_dim, t.feature_dim)
    return s, t, create_objective("gacd", {"steps": 1, **settings}, data=info)


def test_exact_negatives_come_from_other_classes_of_the_whole_pool():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])          # real + generated pool
    _, _, obj = make(labels, nce_k=50)
    idx = torch.tensor([0, 4, 7])
    ci = obj.state.contrast_indices(idx, labels[idx], 50, "exact", torch.Generator().manual_seed(0))
    assert torch.equal(ci[:, 0], idx)                        # the positive first
    for row, i in zip(ci, idx):
        assert (labels[row[1:]] != labels[i]).all()
        assert set(row[1:].tolist()) == set(torch.nonzero(labels != labels[i]).flatten().tolist())


def test_nce_loss_matches_crd_formula_by_hand():
    x = torch.tensor([[0.5, 0.1, 0.2]])                       # positive, two negatives
    n_data, m = 10, 2
    pn = 1 / n_data
    expected = -(math.log(0.5 / (0.5 + m * pn + 1e-7)) + math.log(m * pn / (0.1 + m * pn + 1e-7))
                 + math.log(m * pn / (0.2 + m * pn + 1e-7)))
    assert nce_loss_per_sample(x, n_data).item() == pytest.approx(expected, rel=1e-6)


def test_gacd_step_updates_memory_rows_and_trains_heads(tiny_batch):
    x, y, *_ = tiny_batch
    s, t, obj = make(torch.arange(10).repeat(2), nce_k=8)
    before = obj.state.memory.memory_v1.clone()
    idx = torch.tensor([0, 1, 2, 13, 14, 15])
    loss, parts = obj(s, t, Batch(x, y, index=idx), generator=torch.Generator().manual_seed(0))
    loss.backward()
    changed = (obj.state.memory.memory_v1 != before).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), idx)      # only the positives' rows move
    assert torch.allclose(obj.state.memory.memory_v1[idx].norm(dim=1), torch.ones(6), atol=1e-5)
    assert obj.state.embed_s.linear.weight.grad.abs().sum() > 0
    assert obj.state.memory.z[0] > 0                                # Z fixed from the first batch
    with pytest.raises(Exception, match="pool indices"):
        obj(s, t, Batch(x, y))
