"""CRDND, Adversarial Contrastive Distillation with Adaptive Denoising (Wang, Chen, Yang, Liu,
Liu, Zhang, Qi, ICASSP 2023). RECONSTRUCTION: no official code exists; the equations were read
in a third-party course reproduction of the paper (docs/methods.md, "CRDND", with what is and
is not known). Label results "CRDND (reconstruction)".

    ACM:  M_jj = a_j, M_ij = (1 - a_j) / (k - 1) (i != j), a_j the teacher's accuracy on class j;
          M_1 from clean images, M_2 from adversarial ones; the student's vector v becomes v M^T
    L_nat = NT-Xent over the 2N vectors {M_1 s(x_i)} and {t(x_i)}: positives (i, i+N), the
            denominator over all k != i, mean over the 2N rows, teacher side detached
    L_adv = the same on (M_2 s(x'_i), t(x'_i))
    L = lambda L_nat + (1 - lambda) L_adv,  lambda = 0.2, tau = 0.5
    attack: RSLAD's (maximise KL(p_t(x) || p_s(x')), x + 0.001 N(0, 1), eval mode) [choice]
[choice]s: the per-class accuracies are running counts of the teacher's correct predictions on
the training batches (exponentially decayed, no gradient), a_j = 1 before class j is seen;
M acts on logits (``acm_space``, the literal reading) or on probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import global_sum
from .common import ALPHA, EPS, check_attack, teacher_logits
from .registry import Method, register
from .rslad import RECONSTRUCTION_SCHEDULE, kl_or_ce_attack


@dataclass
class CrdndConfig:
    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    lam: float = 0.2                      # weight of the natural term (report section 4.3)
    tau: float = 0.5                      # NT-Xent temperature, both terms
    acm: bool = True                      # apply the adaptive compensation matrices
    acm_space: Literal["logits", "probs"] = "logits"
    acm_decay: float = 0.99               # per-batch decay of the running per-class counts
    attack: Literal["rslad_kl", "ce"] = "rslad_kl"
    attack_bn_mode: Literal["eval", "train"] = "eval"
    clamp_start: bool = False             # as RSLAD's official attack

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "crdnd")
        if not 0.0 <= self.lam <= 1.0 or self.tau <= 0 or not 0.0 <= self.acm_decay <= 1.0:
            from ..errors import InputError
            raise InputError(f"crdnd: lam and acm_decay must lie in [0, 1] and tau > 0, found "
                             f"lam={self.lam}, tau={self.tau}, acm_decay={self.acm_decay}")


class TeacherClassAccuracy(nn.Module):
    """Running per-class counts of the teacher's correct predictions, clean and adversarial."""

    def __init__(self, num_classes: int):
        super().__init__()
        for view in ("nat", "adv"):
            self.register_buffer(f"correct_{view}", torch.zeros(num_classes, dtype=torch.float64))
            self.register_buffer(f"seen_{view}", torch.zeros(num_classes, dtype=torch.float64))

    def accuracy(self, view: str) -> torch.Tensor:
        seen = getattr(self, f"seen_{view}")
        acc = getattr(self, f"correct_{view}") / seen.clamp(min=1e-12)
        return torch.where(seen > 0, acc, torch.ones_like(acc)).float()

    @torch.no_grad()
    def update(self, view: str, teacher_pred: torch.Tensor, y: torch.Tensor, decay: float) -> None:
        k = len(self.seen_nat)
        seen = global_sum(torch.bincount(y, minlength=k).double())
        correct = global_sum(torch.bincount(y[teacher_pred == y], minlength=k).double())
        for name, batch in (("seen", seen), ("correct", correct)):
            buf = getattr(self, f"{name}_{view}")
            buf.mul_(decay).add_(batch.to(buf.device))


def compensation_matrix(acc: torch.Tensor) -> torch.Tensor:
    """M with M_jj = a_j and M_ij = (1 - a_j)/(k - 1): column j is P(teacher says i | class j),
    so every column sums to 1 and p~ = M p (a row batch: P M^T)."""
    k = len(acc)
    off = ((1 - acc) / max(k - 1, 1)).expand(k, k)
    return torch.where(torch.eye(k, dtype=torch.bool, device=acc.device), acc.expand(k, k), off)


def nt_xent(student_vecs: torch.Tensor, teacher_vecs: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's 2N-way NT-Xent: rows are the N student and N (detached) teacher vectors, each
    row's positive its counterpart, the denominator every other row; mean over the 2N rows."""
    n = len(student_vecs)
    z = F.normalize(torch.cat([student_vecs, teacher_vecs.detach()]).float(), dim=1)
    sim = (z @ z.T) / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, target)


def compensate(logits: torch.Tensor, matrix: torch.Tensor, space: str) -> torch.Tensor:
    vec = logits if space == "logits" else F.softmax(logits, 1)
    return vec @ matrix.T.to(vec.dtype)


def crdnd_loss(student, teacher, batch, cfg: CrdndConfig, step):
    x, y = batch.x, batch.y
    acc_state: TeacherClassAccuracy = step.state
    t_x = teacher_logits(teacher, x, step.autocast)
    x_adv = kl_or_ce_attack(student, x, y, t_x, cfg, step)
    t_adv = teacher_logits(teacher, x_adv, step.autocast)
    with step.autocast():
        s_adv = student(x_adv).float()
        s_x = student(x).float()
    if cfg.acm:
        m_nat = compensation_matrix(acc_state.accuracy("nat").to(x.device))
        m_adv = compensation_matrix(acc_state.accuracy("adv").to(x.device))
        s_x, s_adv = compensate(s_x, m_nat, cfg.acm_space), compensate(s_adv, m_adv, cfg.acm_space)
        acc_state.update("nat", t_x.argmax(1), y, cfg.acm_decay)
        acc_state.update("adv", t_adv.argmax(1), y, cfg.acm_decay)
    nat = nt_xent(s_x, t_x, cfg.tau)
    adv = nt_xent(s_adv, t_adv, cfg.tau)
    loss = cfg.lam * nat + (1 - cfg.lam) * adv
    return loss, {"contrast_nat": nat.detach(), "contrast_adv": adv.detach()}


register(Method(
    name="crdnd", config=CrdndConfig, loss=crdnd_loss, role="student",
    summary="CRDND: contrastive distillation with teacher-accuracy compensation (reconstruction)",
    source="Wang et al., ICASSP 2023 (arXiv 2302.08764) via a third-party reproduction "
           "(SZU-AdvTech-2023/098-..., commit 7eb0b79); docs/methods.md#crdnd",
    # labels: the teacher's per-class accuracies a_j are counted against them; the slides mark
    # CRDND x (docs/methods.md, "Labels")
    uses_labels=True, slides_labels=False, reconstruction=True,
    build_state=lambda cfg, data: TeacherClassAccuracy(data.num_classes),
    schedules={"cifar10": RECONSTRUCTION_SCHEDULE, "cifar100": RECONSTRUCTION_SCHEDULE}))
