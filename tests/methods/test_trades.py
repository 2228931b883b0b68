import copy

import pytest
import torch
import torch.nn.functional as F

from robustkd.data import Batch
from robustkd.methods import create_objective


def test_trades_with_eps_zero_is_cross_entropy(small_models, tiny_batch):
    model, _ = small_models
    model.eval()
    x, y, *_ = tiny_batch
    loss, parts = create_objective("trades", {"eps": 0.0, "steps": 2})(model, None, Batch(x, y))
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


def test_trades_moves_batch_norm_three_times_as_the_official_step(small_models, tiny_batch):
    """Official order: f(x), f(x'), f(x) in train mode; the option drops the repeated forward."""
    model, _ = small_models
    model.train()
    x, y, *_ = tiny_batch
    twin = copy.deepcopy(model)
    create_objective("trades", {"steps": 1})(model, None, Batch(x, y), generator=torch.Generator().manual_seed(0))
    create_objective("trades", {"steps": 1, "official_forward_order": False})(
        twin, None, Batch(x, y), generator=torch.Generator().manual_seed(0))
    bn = [k for k in model.state_dict() if k.endswith("num_batches_tracked")][0]
    assert model.state_dict()[bn].item() == 3 and twin.state_dict()[bn].item() == 2
