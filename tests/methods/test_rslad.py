import pytest
import torch

from robustkd.data import Batch
from robustkd.methods import create_objective

from .helpers import kl, linear_pair, softmax


def test_rslad_by_hand():
    student, teacher = linear_pair(3)
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        t, s = teacher(x).tolist(), student(x).tolist()
    per = [kl(softmax(a), softmax(b), log_eps=1e-5) for a, b in zip(t, s)]
    # eps = 0: x' = x; the official reduction averages over batch x classes (C = 4), and the
    # official KL takes log(p_t + 1e-5)
    loss, _ = create_objective("rslad", {"eps": 0.0, "steps": 1})(student, teacher, Batch(x, y))
    assert loss.item() == pytest.approx(sum(per) / 2 / 4, rel=1e-5)
    loss100, _ = create_objective("rslad", {"eps": 0.0, "steps": 1}, dataset="cifar100")(student, teacher, Batch(x, y))
    assert loss100.item() == pytest.approx(10 * loss.item(), rel=1e-5)
