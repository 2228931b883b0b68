"""AT-PRM (robustkd/methods/at_prm.py) against the official train_cifar.py @ b826030: the warm-up,
PRM's masks, ARD's gradient gates, the training step."""

import pytest
import torch
import torch.nn.functional as F

from robustkd.data import Batch
from robustkd.errors import InputError
from robustkd.methods import create_objective
from robustkd.methods.at_prm import (AtPrmConfig, attention_gates, drop_rate_at, mix, prm_ard_attack, prm_mask,
                                     soft_cross_entropy)
from robustkd.models import create_model

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return create_model("vit_b_4", **TINY)


def test_drop_rate_warms_up_linearly_over_n_w_epochs():
    cfg = AtPrmConfig()
    assert [drop_rate_at(t, cfg) for t in (0.0, 2.5, 5.0, 9.99)] == pytest.approx([0.0, 0.25, 0.5, 0.999])
    assert drop_rate_at(10.0, cfg) == 1.0 and drop_rate_at(39.5, cfg) == 1.0
    half = AtPrmConfig(drop_rate=0.5, warmup_epochs=4)
    assert drop_rate_at(2.0, half) == 0.25 and drop_rate_at(4.0, half) == 0.5


@pytest.mark.parametrize("rate,masked", [(0.0, 64), (0.25, 48), (0.5, 32), (0.999, 0), (1.0, 0)])
def test_prm_masks_int_64_times_one_minus_rate_patches(rate, masked):
    x = torch.rand(3, 3, 32, 32)
    mask, num = prm_mask(x, rate, 4, torch.Generator().manual_seed(0))
    assert num == masked == int(64 * (1 - rate))
    assert mask.shape == (1, 1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    patches = mask[0, 0].reshape(8, 4, 8, 4).permute(0, 2, 1, 3).reshape(64, 16)
    assert ((patches == 0).all(1) | (patches == 1).all(1)).all()   # whole 4 x 4 patches
    assert int((patches[:, 0] == 0).sum()) == masked


def test_prm_attack_stays_in_the_ball_and_the_image_range_and_masked_patches_take_one_step():
    model = tiny_vit()
    x = torch.rand(4, 3, 32, 32)
    target = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    cfg = AtPrmConfig(steps=3, ard=False)
    adv = prm_ard_attack(model, x, target, cfg, drop_rate=0.0, generator=torch.Generator().manual_seed(0))
    delta = adv - x
    assert delta.abs().max() <= cfg.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # drop rate 0: every patch masked at every iteration, so delta is the last sign step alone (clamped)
    step = delta.abs()
    inside = (x > cfg.step_size) & (x < 1 - cfg.step_size)
    assert torch.allclose(step[inside], torch.full_like(step[inside], cfg.step_size), atol=1e-6)
    free = prm_ard_attack(model, x, target, AtPrmConfig(steps=3, ard=False), drop_rate=1.0,
                          generator=torch.Generator().manual_seed(0)) - x
    assert free.abs().max() > cfg.step_size + 1e-4    # unmasked: steps accumulate


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    model(x).sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ard_gate_zeroes_the_attention_branch_gradient_at_rate_0_and_is_identity_at_rate_1():
    model = tiny_vit().eval()
    x = torch.rand(2, 3, 32, 32)
    gx, gp = _grads(model, x)
    model.zero_grad()
    with attention_gates(model, 1.0, torch.Generator().manual_seed(0)) as n:
        gx1, gp1 = _grads(model, x)
    assert n == 2 and torch.equal(gx, gx1) and all(torch.equal(gp[k], gp1[k]) for k in gp)
    model.zero_grad()
    with attention_gates(model, 0.0, torch.Generator().manual_seed(0)):
        logits = model(x)
        gx0, gp0 = _grads(model, x)
    with torch.no_grad():
        assert torch.allclose(model(x), logits)          # forward unchanged
    # no gradient reaches the attention weights; the MLP branch still gets one. The input gets none:
    # the logits read the CLS token, which sees the patches only through attention (so at drop rate 0
    # the official attack with ARD has a zero gradient and sign(0) = 0 steps).
    for name, grad in gp0.items():
        if ".attn." in name or ".norm1." in name:
            assert grad.abs().max() == 0, name
    assert gp0["backbone.vit.blocks.0.mlp.fc1.weight"].abs().max() > 0 and gx0.abs().max() == 0
    model.zero_grad()
    gx2, gp2 = _grads(model, x)                           # gates gone after the context
    assert torch.equal(gx, gx2) and all(torch.equal(gp[k], gp2[k]) for k in gp)
    assert not any(b.attn._forward_hooks for b in model.backbone.vit.blocks)


def test_ard_refuses_a_model_without_attention_blocks():
    with pytest.raises(InputError, match="ard"):
        with attention_gates(create_model("resnet10_w8"), 0.5):
            pass


def test_mixup_is_timm_with_the_official_arguments_and_repeats_with_the_generator():
    cfg = AtPrmConfig(mixup_prob=1.0)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    a = mix(x, y, 10, cfg, torch.Generator().manual_seed(3))
    b = mix(x, y, 10, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[1].sum(1), torch.ones(4)) and not torch.equal(a[0], x)
    assert torch.equal(x, x.clone())                   # the batch itself untouched
    with pytest.raises(InputError, match="even batch"):
        mix(x[:3], y[:3], 10, cfg)


def test_soft_cross_entropy_of_one_hot_targets_is_cross_entropy():
    z, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert torch.allclose(soft_cross_entropy(z, F.one_hot(y, 10).float()), F.cross_entropy(z, y))


def test_an_at_prm_training_step_runs_on_a_tiny_vit_and_leaves_no_gates():
    model = tiny_vit().train()
    objective = create_objective("at_prm", {"steps": 2})
    batch = Batch(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss, parts = objective(model, None, batch, generator=torch.Generator().manual_seed(0), epoch_float=2.5)
    assert torch.isfinite(loss) and parts["drop_rate"] == 0.25 and model.training
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().max() > 0   # training step: ungated
    assert not any(b.attn._forward_hooks for b in model.backbone.vit.blocks)
    again, _ = objective(tiny_vit().train(), None, batch, generator=torch.Generator().manual_seed(0), epoch_float=2.5)
    assert torch.equal(loss.detach(), again.detach())   # seeded: the same draws


def test_official_recipe_is_registered():
    from robustkd.methods import get_method

    m = get_method("at_prm")
    s = m.schedules["cifar10"]
    assert m.role == "teacher" and "b826030" in m.source
    assert (s.epochs, s.batch_size, s.lr, s.weight_decay, s.milestones) == (40, 64, 0.1, 1e-4, (35, 38))
    cfg = AtPrmConfig()
    assert (cfg.steps, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob) == (10, 0.8, 1.0, 0.3, 0.5)
