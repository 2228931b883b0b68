"""TRADES teacher training (Zhang et al., ICML 2019), as the official code computes it.

Official code: github.com/yaodongyu/TRADES, ``trades.py::trades_loss`` and
``train_trades_cifar10.py`` (docs/official-baselines.md, "TRADES", commit there).

    attack: maximise KL(p(x) || p(x')) from x + 0.001 N(0, 1) (first gradient at the unclamped
            start), n steps of alpha, model in eval mode
    loss:   CE(f(x), y) + beta * KL(p(x) || p(x')), batchmean; the clean term is not detached
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .. import attacks
from ..attacks import kl_per_sample, model_modes
from .common import ALPHA, EPS, check_attack
from .registry import Method, Schedule, register


@dataclass
class TradesConfig:
    eps: float = EPS                      # L-inf radius, [0, 1] pixels (official 0.031)
    step_size: float = ALPHA              # official 0.007 with eps 0.031; 2/255 with 8/255
    steps: int = 10
    beta: float = 6.0                     # official CIFAR-10 setting
    random_start: Literal["normal", "uniform"] = "normal"   # x + 0.001 N(0, 1), as official
    clamp_start: bool = False             # official: first gradient at the unclamped start
    attack_bn_mode: Literal["eval", "train"] = "eval"
    # The official step forwards x, x' and x again in train mode (the KL's target is a second
    # forward of x), so batch norm's running statistics move three times per step.
    official_forward_order: bool = True

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "trades")


def trades_loss(model, teacher, batch, cfg: TradesConfig, step):
    x, y = batch.x, batch.y
    mode = model.training
    with model_modes([model], [False]), torch.no_grad(), step.autocast():   # a detached target: no graph
        target = model(x).float()
    x_adv = attacks.pgd_kl(model, x, target, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start=cfg.random_start, clamp_start=cfg.clamp_start, bn_mode=cfg.attack_bn_mode,
                           generator=step.generator, autocast=step.autocast)
    model.train(mode)
    with step.autocast():
        nat = model(x).float()
        adv = model(x_adv).float()
        nat_target = model(x).float() if cfg.official_forward_order else nat
    ce = F.cross_entropy(nat, y)
    robust = kl_per_sample(nat_target, adv).mean()
    return ce + cfg.beta * robust, {"ce": ce.detach(), "kl": robust.detach()}


register(Method(
    name="trades", config=TradesConfig, loss=trades_loss, role="teacher", slides_labels=True,
    summary="TRADES adversarial training (teacher)",
    source="yaodongyu/TRADES trades.py (docs/official-baselines.md#trades)",
    schedules={ds: Schedule(epochs=76, lr=0.1, weight_decay=2e-4, milestones=(74, 89, 99),
                            source="TRADES train_trades_cifar10.py adjust_learning_rate: x0.1 from (1-based) epoch 75, 90, 100; milestones here are 0-based")
               for ds in ("cifar10", "cifar100")}))
