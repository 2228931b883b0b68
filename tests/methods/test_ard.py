import pytest
import torch

from robustkd.data import Batch
from robustkd.methods import create_objective

from .helpers import kl, linear_pair, softmax


def test_ard_by_hand():
    student, teacher = linear_pair(3)
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        t, s = teacher(x).tolist(), student(x).tolist()
    # eps = 0: x' = x; official nn.KLDivLoss() averages over batch x classes (C = 4), times T^2
    loss, _ = create_objective("ard", {"eps": 0.0, "steps": 1, "temperature": 2.0})(student, teacher, Batch(x, y))
    per_t = [kl(softmax([v / 2 for v in a]), softmax([v / 2 for v in b])) for a, b in zip(t, s)]
    assert loss.item() == pytest.approx(4 * sum(per_t) / 2 / 4, rel=1e-5)


def test_ard_forwards_the_clean_image_even_at_alpha_one(small_models, tiny_batch):
    """As the official step: the clean forward moves batch norm although its weight is 0."""
    student, teacher = small_models
    student.train()
    x, y, *_ = tiny_batch
    create_objective("ard", {"steps": 1, "attack_bn_mode": "eval"})(student, teacher, Batch(x, y))
    bn = [k for k in student.state_dict() if k.endswith("num_batches_tracked")][0]
    assert student.state_dict()[bn].item() == 2
