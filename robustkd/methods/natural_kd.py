"""Clean distillation KL(p_t(x) || p_s(x)) without adversarial examples (Hinton et al. 2015, at
temperature tau): the non-robust reference student beside the robust methods."""

from __future__ import annotations

from dataclasses import dataclass

from ..attacks import kl_per_sample
from .common import teacher_logits
from .ard import ARD_SCHEDULE
from .registry import Method, register


@dataclass
class NaturalKdConfig:
    tau: float = 1.0          # softmax temperature of both distributions


def natural_kd_loss(student, teacher, batch, cfg: NaturalKdConfig, step):
    t_x = teacher_logits(teacher, batch.x, step.autocast)
    with step.autocast():
        kd = kl_per_sample(t_x, student(batch.x).float(), cfg.tau).mean()
    return kd, {"kd": kd.detach()}


register(Method(name="natural_kd", config=NaturalKdConfig, loss=natural_kd_loss, role="student",
                summary="clean knowledge distillation (non-robust reference)",
                source="Hinton et al. 2015, 'Distilling the knowledge in a neural network'",
                uses_labels=False, schedules={"cifar10": ARD_SCHEDULE, "cifar100": ARD_SCHEDULE}))
