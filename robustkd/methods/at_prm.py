"""AT-PRM (Mo, Wu, Wang, Guo, Wang, "When Adversarial Training Meets Vision Transformers: Recipes
from Training to Architecture", NeurIPS 2022): PGD-AT of a ViT with the two warm-ups of the
official code, mo666666/When-Adversarial-Training-Meets-Vision-Transformers @
b826030ad5c2dce94156d37ebe7f5bb3e4d67d83 (``train_cifar.py``, ``--method AT --ARD --PRM``; defaults
``parser_cifar.py``). A teacher method.

One variable drives both warm-ups: ``drop_rate = t / n_w * drop_rate_max`` for the fractional epoch
``t < n_w`` (``t = epoch + (step + 1) / steps_per_epoch``), ``drop_rate_max`` after (defaults
``n_w = 10``, ``drop_rate_max = 1``).

* PRM (perturbation random masking), in every attack iteration: a fresh mask zeroes
  ``int(64 * (1 - drop_rate))`` random 4 x 4 patches (the same patches for the whole batch), then
  ``delta = delta * mask``, the forward at ``x + delta``, the gradient with respect to that
  (masked) ``delta``, the sign step and the clamps: masked patches restart from 0 and take one step.
* ARD (attention random dropping), during the attack only: the gradient through each block's
  attention branch is multiplied by ``gamma = 0 if U(0, 1) > drop_rate else 1``, drawn per block and
  attack iteration. The official code registers a backward hook on each Block's ``drop_path`` (an
  identity on the attention branch only, ``x = x + drop_path(attn(norm1(x)))``) and removes the
  hooks before the training step; here a gradient gate (forward identity, backward x gamma) on the
  output of each timm Block's ``attn`` does the same, added for the attack and removed after it.
* PGD-AT: uniform start in the eps-ball clamped to the image range, 10 steps of 2/255, eps 8/255,
  the model in eval mode during the attack; the loss at the adversarial point in train mode.
* Mixup/CutMix (timm ``Mixup``: mixup alpha 0.8, cutmix alpha 1.0, prob 0.3, switch prob 0.5,
  mode "batch", label smoothing 0) applied to the clean batch before the attack, as in the
  official AT branch; attack and training loss are then ``SoftTargetCrossEntropy`` on the mixed
  targets. ``mixup: 0, cutmix: 0`` turns it off (plain CE).

Differences from the official code (each a named setting or a documented non-difference):
the random draws (PRM's patches, ARD's gammas, Mixup's parameters) come from the run's seeded attack
generator instead of Python's/NumPy's global generators (timm's Mixup runs under a NumPy state
seeded from it and restored after), so runs repeat and resume; gammas are drawn at the forward of
each block instead of in the backward hook (the same distribution: one draw per block and attack
iteration); the attack works in [0, 1] pixels with the normalisation inside the model (the official
code divides eps and alpha by the std and clamps to the normalised image range: the same
constraint). ``prm``/``ard`` switch the warm-ups off (``--PRM``/``--ARD`` absent).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import attack_view, frozen_parameters, model_modes, unwrap
from ..errors import InputError
from .common import ALPHA, EPS, check_attack
from .registry import Method, Schedule, register

SOURCE = ("mo666666/When-Adversarial-Training-Meets-Vision-Transformers@b826030: train_cifar.py, "
          "parser_cifar.py")


@dataclass
class AtPrmConfig:
    eps: float = EPS                    # --epsilon 8 (/255)
    step_size: float = ALPHA            # --alpha 2 (/255)
    steps: int = 10                     # --attack-iters 10
    attack_bn_mode: Literal["eval", "train"] = "eval"   # model.eval() inside pgd_attack()
    prm: bool = True                    # --PRM: perturbation random masking
    ard: bool = True                    # --ARD: attention random dropping (gradient gates)
    drop_rate: float = 1.0              # --drop-rate: the warm-up's final value
    warmup_epochs: float = 10.0         # --n_w
    patch_size: int = 4                 # --patch (PRM's patches)
    mixup: float = 0.8                  # --mixup (alpha; 0: off)
    cutmix: float = 1.0                 # --cutmix (alpha; 0: off)
    mixup_prob: float = 0.3             # --mixup-prob
    mixup_switch_prob: float = 0.5      # --mixup-switch-prob
    label_smoothing: float = 0.0        # --labelsmoothvalue

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "at_prm")
        if not 0.0 <= self.drop_rate <= 1.0:
            raise InputError(f"drop_rate: expected a value in [0, 1], found {self.drop_rate}")
        if self.warmup_epochs < 0:
            raise InputError(f"warmup_epochs: expected >= 0, found {self.warmup_epochs}")
        if self.patch_size < 1:
            raise InputError(f"patch_size: expected >= 1, found {self.patch_size}")
        for name in ("mixup_prob", "mixup_switch_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name}: expected a value in [0, 1], found {getattr(self, name)}")

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def drop_rate_at(t: float, cfg: AtPrmConfig) -> float:
    """``t / n_w * drop_rate`` for ``t < n_w``, else ``drop_rate`` (train_cifar.py, train_step)."""
    if t < cfg.warmup_epochs:
        return t / cfg.warmup_epochs * cfg.drop_rate
    return cfg.drop_rate


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def prm_mask(x: torch.Tensor, drop_rate: float, patch: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, int]:
    """(mask shaped (1, 1, H, W), number of masked patches): ``int(max_num_patch * (1 - drop_rate))``
    random ``patch`` x ``patch`` patches are 0, the rest 1 (the official ``add_noise_mask``)."""
    h, w = x.shape[-2:]
    rows, cols = h // patch, w // patch
    total = rows * cols
    num = int(total * (1 - drop_rate))
    keep = torch.ones(total, device=x.device, dtype=x.dtype)
    if num:
        order = torch.argsort(_rand(total, generator, x.device))
        keep[order[:num]] = 0
    mask = keep.view(rows, cols).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    full = torch.ones(h, w, device=x.device, dtype=x.dtype)
    full[:rows * patch, :cols * patch] = mask
    return full.view(1, 1, h, w), num


class _GradGate(torch.autograd.Function):
    """Forward: identity. Backward: the gradient times ``gamma`` (a 0-d tensor: no host sync)."""

    @staticmethod
    def forward(ctx, x, gamma):
        ctx.save_for_backward(gamma)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        gamma, = ctx.saved_tensors
        return grad * gamma.to(grad.dtype), None


def grad_gate(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return _GradGate.apply(x, gamma)


@contextlib.contextmanager
def attention_gates(model: torch.nn.Module, drop_rate: float, generator: torch.Generator | None = None):
    """ARD: while open, each transformer block's attention-branch output passes a gradient gate with
    ``gamma = 0 if U(0, 1) > drop_rate else 1`` drawn at every forward of the block. Yields the
    number of gated blocks; the hooks are removed on exit."""
    from ..models.vit import attention_blocks

    blocks = attention_blocks(model)

    def hook(_module, _inputs, output):
        gamma = (_rand((), generator, output.device) <= drop_rate).float()
        return grad_gate(output, gamma)

    if not blocks:
        raise InputError(f"at_prm: ard (attention random dropping) gates transformer blocks, and "
                         f"{type(model).__name__} has none (a ViT teacher: vit_b_4, deit_s_4); or set ard: false")
    handles = [b.get_submodule("attn").register_forward_hook(hook) for b in blocks]
    try:
        yield len(blocks)
    finally:
        for h in handles:
            h.remove()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's ``SoftTargetCrossEntropy``: mean over the batch of ``sum(-target * log_softmax)``."""
    return (-target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: AtPrmConfig,
        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Mixup`` with the official arguments on a copy of the batch, under a NumPy state seeded
    from ``generator`` (restored after). Returns (images, soft targets)."""
    from timm.data import Mixup

    if len(x) % 2:
        raise InputError(f"at_prm: Mixup/CutMix ('batch' mode, as the official code) needs an even batch, "
                         f"found {len(x)} images; set an even batch size or mixup: 0, cutmix: 0")
    fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=None, prob=cfg.mixup_prob,
               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
               num_classes=num_classes)
    seed = int(_rand((), generator, x.device).item() * 2**31)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        xm, ym = fn(x.clone(), y)
    finally:
        np.random.set_state(state)
    return xm, ym


def prm_ard_attack(model, x: torch.Tensor, target: torch.Tensor, cfg: AtPrmConfig, drop_rate: float,
                   generator: torch.Generator | None = None, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The official ``pgd_attack()`` of the AT branch: soft-target CE ascended from a uniform start,
    with PRM's per-iteration mask on ``delta`` and ARD's gates during the whole attack."""
    model = attack_view(model)   # compiled kept, DDP skipped
    x = x.detach()
    delta = (_rand(x.shape, generator, x.device) * 2 - 1) * cfg.eps
    delta = torch.min(torch.max(delta, -x), 1 - x)          # clamp(delta, lower_limit - X, upper_limit - X)
    gates = attention_gates(model, drop_rate, generator) if cfg.ard else contextlib.nullcontext()
    with model_modes([model], [cfg.attack_bn_mode == "train"]), frozen_parameters(model), gates, \
            torch.enable_grad():
        for _ in range(cfg.steps):
            mask, _ = prm_mask(x, drop_rate, cfg.patch_size, generator)
            if cfg.prm:
                delta = delta * mask
            delta = delta.detach().requires_grad_(True)
            with autocast():
                logits = model(x + delta)
            grad, = torch.autograd.grad(soft_cross_entropy(logits, target), delta)
            delta = (delta.detach() + cfg.step_size * grad.sign()).clamp(-cfg.eps, cfg.eps)
            delta = torch.min(torch.max(delta, -x), 1 - x)
    return (x + delta).detach()


def at_prm_loss(model, teacher, batch, cfg: AtPrmConfig, step):
    rate = drop_rate_at(step.progress, cfg)
    x, y = batch.x, batch.y
    num_classes = int(getattr(unwrap(model), "options", {}).get("num_classes", 0)) or int(y.max()) + 1
    if cfg.mixup_active:
        x, target = mix(x, y, num_classes, cfg, step.generator)
    else:
        target = F.one_hot(y, num_classes).float()
    x_adv = prm_ard_attack(model, x, target, cfg, rate, step.generator, step.autocast)
    with step.autocast():
        logits = model(x_adv).float()
    loss = soft_cross_entropy(logits, target)
    return loss, {"ce_adv": loss.detach(), "drop_rate": float(rate)}


register(Method(
    name="at_prm", config=AtPrmConfig, loss=at_prm_loss, role="teacher",
    summary="AT-PRM: PGD-AT of a ViT with PRM and ARD warm-ups (teacher)",
    source=SOURCE,
    tiny={"ard": False},   # ARD gates attention blocks: the stand-ins are CNNs (ARD makes no pass of its own)
    # 40 epochs, bs 64, SGD 0.1 / 0.9, wd 1e-4; lr 0.1 -> 0.01 at epoch 35 -> 0.001 at 38 (per step,
    # lr_schedule(epoch_now)); gradient norm clipped to 1.0 (optim.grad_clip in the presets).
    schedules={"cifar10": Schedule(epochs=40, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=64,
                                   milestones=(35, 38), gamma=0.1, source=SOURCE)}))
