"""AdaAD, Adaptive Adversarial Distillation (Huang, Chen, Wang, Lu, Cheng, Wang, CVPR 2023), as the
official code computes it (docs/official-baselines.md, "AdaAD").

    attack: maximise KL(p_t(x') || p_s(x')) with the teacher evaluated at the moving point, from
            x + 0.001 N(0, 1) (first gradient at the unclamped start), student in eval mode
    loss:   alpha KL(p_t(x') || p_s(x')) + (1 - alpha) KL(p_t(x) || p_s(x)), alpha = 1; the official
            CIFAR-10 branch averages over batch x classes (nn.KLDivLoss()), the CIFAR-100 branch
            over the batch (``kl_reduction`` by dataset)
The official step forwards the student on x (train mode) before x' even at alpha = 1, which moves
batch norm's running statistics: so does this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import attacks
from ..attacks import kl_per_sample, model_modes
from .common import ALPHA, EPS, check_attack, reduce_kl, teacher_logits
from .registry import Method, Schedule, register


@dataclass
class AdaadConfig:
    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    random_start: Literal["normal", "uniform"] = "normal"
    clamp_start: bool = False             # official: first gradient at the unclamped start
    attack_bn_mode: Literal["eval", "train"] = "eval"
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "elementwise_mean"  # CIFAR-10 branch
    alpha: float = 1.0                    # weight of the adversarial term (official AdaAD_alpha 1.0)

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "adaad")


def adaad_attack(student, teacher, x, cfg: AdaadConfig, step):
    view = attacks.attack_view(student)   # compiled kept, DDP skipped

    def loss_at(point):
        with step.autocast():
            return kl_per_sample(teacher(point), view(point))

    with model_modes([view, teacher], [cfg.attack_bn_mode == "train", False]), \
            attacks.frozen_parameters(view, teacher):
        return attacks.ascend(loss_at, x, cfg.eps, cfg.step_size, cfg.steps, cfg.random_start,
                              cfg.clamp_start, generator=step.generator)


def adaad_loss(student, teacher, batch, cfg: AdaadConfig, step):
    x = batch.x
    x_adv = adaad_attack(student, teacher, x, cfg, step)
    t_x = teacher_logits(teacher, x, step.autocast)
    t_adv = teacher_logits(teacher, x_adv, step.autocast)
    with step.autocast():
        s_x = student(x).float()                       # official order: x, then x'
        s_adv = student(x_adv).float()
    C = t_adv.shape[1]
    adv = reduce_kl(kl_per_sample(t_adv, s_adv), C, cfg.kl_reduction)
    nat = reduce_kl(kl_per_sample(t_x, s_x), C, cfg.kl_reduction)
    loss = cfg.alpha * adv + (1 - cfg.alpha) * nat
    return loss, {"kl_adv": adv.detach(), "kl_nat": nat.detach()}


ADAAD_SCHEDULE = Schedule(epochs=200, lr=0.1, weight_decay=5e-4, milestones=(100, 150),
                          source="AdaAD official main.py: 0.1, 0.01 from 100, 0.001 from 150, wd 5e-4")

register(Method(
    name="adaad", config=AdaadConfig, loss=adaad_loss, role="student",
    summary="AdaAD: the teacher's KL at the moving adversarial point, attack and loss",
    source="AdaAD official code (docs/official-baselines.md#adaad)",
    uses_labels=False,
    dataset_defaults=lambda dataset: {"kl_reduction": "batchmean"} if dataset == "cifar100" else {},
    schedules={"cifar10": ADAAD_SCHEDULE, "cifar100": ADAAD_SCHEDULE}))
