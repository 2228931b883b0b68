import pytest
import torch

from robustkd.data import Batch
from robustkd.methods import create_objective

from .helpers import kl, linear_pair, softmax


def test_adaad_reduction_follows_the_dataset_branch():
    student, teacher = linear_pair(5)
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        per = [kl(softmax(a), softmax(b)) for a, b in zip(teacher(x).tolist(), student(x).tolist())]
    c10, _ = create_objective("adaad", {"eps": 0.0, "steps": 1})(student, teacher, Batch(x, y))
    c100, _ = create_objective("adaad", {"eps": 0.0, "steps": 1}, dataset="cifar100")(student, teacher, Batch(x, y))
    assert c10.item() == pytest.approx(sum(per) / 2 / 4, rel=1e-5)      # batch x classes (C = 4)
    assert c100.item() == pytest.approx(sum(per) / 2, rel=1e-5)         # batch
