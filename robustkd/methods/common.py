"""Helpers the methods share: KL reductions, the teacher's no-grad forward, sign checks."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..attacks import ALPHA_DEFAULT, EPS_DEFAULT, model_modes
from ..errors import InputError

EPS = EPS_DEFAULT       # L-inf radius 8/255, [0, 1] pixel units (one home: robustkd/attacks.py)
ALPHA = ALPHA_DEFAULT   # attack step 2/255, [0, 1] pixel units

KlReduction = ("batchmean", "elementwise_mean")


def reduce_kl(per_sample: torch.Tensor, num_classes: int, reduction: str) -> torch.Tensor:
    """'batchmean': mean over the batch of the class-summed KL (the default of docs/methods.md).
    'elementwise_mean': mean over batch x classes, i.e. batchmean / C (``nn.KLDivLoss()``'s
    default reduction, which several official codes use)."""
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "elementwise_mean":
        return per_sample.mean() / num_classes
    raise InputError(f"unknown KL reduction {reduction!r}; expected one of {list(KlReduction)}")


def teacher_logits(teacher: nn.Module, x: torch.Tensor, autocast) -> torch.Tensor:
    """The teacher's float32 logits in eval mode, without gradient. Inference mode (no autograd
    bookkeeping at all); the clone is a normal tensor, which the loss's backward may save."""
    with model_modes([teacher], [False]), torch.inference_mode(), autocast():
        out = teacher(x).float()
    return out.clone()


def check_attack(eps: float, step_size: float, steps: int, method: str) -> None:
    """eps and step in [0, 1] pixel units, steps >= 0 (0: no attack). The message starts with the
    field's name, so ``from_dict`` reports it as ``<where>.<field>``."""
    for name, value in (("eps", eps), ("step_size", step_size)):
        if not 0.0 <= value <= 1.0:
            hint = f" (did you mean {value:g}/255?)" if value > 1 else ""
            raise InputError(f"{name}: expected a value in [0, 1] pixel units, found {value:g}{hint}")
    if steps < 0:
        raise InputError(f"steps: expected >= 0, found {steps}")
