"""PGD adversarial training (Madry et al., ICLR 2018): CE(f(x'), y), x' from PGD on the CE with
a uniform start in the eps-ball (a teacher method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F

from .. import attacks
from .common import ALPHA, EPS, check_attack
from .registry import Method, Schedule, register


@dataclass
class PgdAtConfig:
    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    attack_bn_mode: Literal["eval", "train"] = "eval"

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "pgd_at")


def pgd_at_loss(model, teacher, batch, cfg: PgdAtConfig, step):
    x_adv = attacks.pgd_ce(model, batch.x, batch.y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps,
                           start="uniform", bn_mode=cfg.attack_bn_mode, generator=step.generator,
                           autocast=step.autocast)
    with step.autocast():
        ce = F.cross_entropy(model(x_adv).float(), batch.y)
    return ce, {"ce_adv": ce.detach()}


register(Method(
    name="pgd_at", config=PgdAtConfig, loss=pgd_at_loss, role="teacher",
    summary="PGD adversarial training (teacher)",
    source="Madry et al., ICLR 2018, Eq. 2.1",
    schedules={ds: Schedule(epochs=200, milestones=(100, 150), weight_decay=5e-4, source="common recipe")
               for ds in ("cifar10", "cifar100")}))
