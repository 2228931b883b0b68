"""GACD, Feature Distillation with Guided Adversarial Contrastive Learning (Bai, Chen, Zhao, Wen,
Jiang, Kot, arXiv 2009.09922, 2020). RECONSTRUCTION: neither code nor full text is available.
Built on the machinery the abstract describes, CRD's (Tian, Krishnan, Isola, ICLR 2020), whose
official code is transcribed exactly: HobbitLong/RepDistiller at b84f547, ``crd/criterion.py``
(Embed, ContrastLoss) and ``crd/memory.py`` (ContrastMemory). Label results
"GACD (reconstruction)"; docs/methods.md, "GACD", lists what is known and what is chosen.

    anchor: the teacher's penultimate feature of the clean image x_i (the abstract's
            "teacher as an anchor"); positive: the student's feature of its adversarial x'_i
    L = contrast_weight * sum_i w_i l_NCE(i) / B + cls_weight * cls_term
    l_NCE: CRD's NCE loss (both anchored views, 128-d heads, K = 16384 negatives from a
           momentum-0.5 memory of the whole training pool, T = 0.07, Z fixed from the first batch)
    w_i:   the "sample re-weighting" for teacher errors [choice]: p_t(x_i)_{y_i}
    cls_term: KL(p_t(x) || p_s(x')) [choice] (a feature objective alone trains no classifier)
    attack: RSLAD-style KL to the teacher's clean soft labels, student eval mode [choice]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks import kl_per_sample, model_modes
from ..distributed import all_gather_cat
from ..errors import InputError
from .common import ALPHA, EPS, check_attack
from .registry import DataInfo, Method, register
from .rslad import RECONSTRUCTION_SCHEDULE, kl_or_ce_attack

NCE_EPS = 1e-7   # CRD's ContrastLoss eps


@dataclass
class GacdConfig:
    eps: float = EPS
    step_size: float = ALPHA
    steps: int = 10
    attack: Literal["rslad_kl", "ce"] = "rslad_kl"
    attack_bn_mode: Literal["eval", "train"] = "eval"
    clamp_start: bool = False
    feat_dim: int = 128                    # CRD --feat_dim
    nce_k: int = 16384                     # CRD --nce_k: negatives per sample
    nce_t: float = 0.07                    # CRD --nce_t
    nce_m: float = 0.5                     # CRD --nce_m: memory momentum
    negatives: Literal["exact", "uniform"] = "exact"   # CRD mode 'exact': other classes only
    contrast_weight: float = 0.8           # CRD's beta in its README commands
    reweight: Literal["teacher_true_prob", "teacher_correct", "none"] = "teacher_true_prob"
    cls_term: Literal["kl", "ce", "none"] = "kl"
    cls_weight: float = 1.0

    def __post_init__(self):
        check_attack(self.eps, self.step_size, self.steps, "gacd")
        if self.nce_k < 1 or self.feat_dim < 1 or self.nce_t <= 0 or not 0 <= self.nce_m < 1:
            raise InputError(f"gacd: nce_k and feat_dim must be >= 1, nce_t > 0, nce_m in [0, 1); found "
                             f"nce_k={self.nce_k}, feat_dim={self.feat_dim}, nce_t={self.nce_t}, nce_m={self.nce_m}")


class Embed(nn.Module):
    """CRD's head: Linear then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


class ContrastMemory(nn.Module):
    """CRD's two memory banks (one per network) over the ``n_data`` pool samples.

    ``forward(v1, v2, idx, contrast_idx)`` returns CRD's (out_v1, out_v2): the exp(m . v / T) / Z
    scores of each sample's K+1 bank rows (the positive first) against the *other* network's
    embedding, then moves the positive rows by momentum and re-normalises them."""

    def __init__(self, feat_dim: int, n_data: int, k: int, t: float, momentum: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.k, self.t, self.momentum = k, t, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_v1", "memory_v2"):
            self.register_buffer(name, torch.rand(n_data, feat_dim, generator=generator).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.tensor([-1.0, -1.0]))   # Z_v1, Z_v2 (set on first use)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor):
        b, d = v1.shape
        n_data = self.memory_v1.shape[0]
        w1 = self.memory_v1.index_select(0, contrast_idx.view(-1)).detach().view(b, self.k + 1, d)
        out_v2 = torch.exp(torch.bmm(w1, v2.view(b, d, 1)) / self.t)
        w2 = self.memory_v2.index_select(0, contrast_idx.view(-1)).detach().view(b, self.k + 1, d)
        out_v1 = torch.exp(torch.bmm(w2, v1.view(b, d, 1)) / self.t)
        with torch.no_grad():
            if self.z[0] < 0:   # CRD: Z = mean score x n_data, from the first batch (all ranks')
                z = torch.stack([out_v1.mean(), out_v2.mean()]) * n_data
                self.z.copy_(all_gather_cat(z[None]).mean(0))
        out_v1 = out_v1 / self.z[0]
        out_v2 = out_v2 / self.z[1]
        self._update(v1, v2, idx)
        return out_v1, out_v2

    @torch.no_grad()
    def _update(self, v1, v2, idx):
        """Momentum update of the positive rows; under torchrun every rank applies the global
        batch's rows, so the banks stay identical across ranks."""
        idx, v1, v2 = all_gather_cat(idx), all_gather_cat(v1.float()), all_gather_cat(v2.float())
        for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            pos = memory.index_select(0, idx).mul_(self.momentum).add_(v * (1 - self.momentum))
            memory.index_copy_(0, idx, F.normalize(pos, p=2, dim=1))


def nce_loss_per_sample(x: torch.Tensor, n_data: int) -> torch.Tensor:
    """CRD's ContrastLoss (its Eq. 18) before the batch sum: -(log D1 + sum log D0) per sample."""
    m = x.shape[1] - 1
    pn = 1.0 / float(n_data)
    p_pos = x[:, 0]
    log_d1 = torch.log(p_pos / (p_pos + m * pn + NCE_EPS))
    p_neg = x[:, 1:]
    log_d0 = torch.log((m * pn) / (p_neg + m * pn + NCE_EPS))
    return -(log_d1.view(len(x)) + log_d0.view(len(x), -1).sum(1))


class GacdState(nn.Module):
    """The trainable heads, the memory banks and the pool's labels (for 'exact' negatives)."""

    def __init__(self, cfg: GacdConfig, data: DataInfo):
        super().__init__()
        if not data.student_feature_dim or not data.teacher_feature_dim:
            raise InputError("gacd needs the penultimate feature sizes of student and teacher")
        gen = torch.Generator().manual_seed(0)
        self.embed_s = Embed(data.student_feature_dim, cfg.feat_dim)
        self.embed_t = Embed(data.teacher_feature_dim, cfg.feat_dim)
        labels = torch.as_tensor(data.labels, dtype=torch.long)
        self.n_data = len(labels)
        self.memory = ContrastMemory(cfg.feat_dim, self.n_data, cfg.nce_k, cfg.nce_t, cfg.nce_m, gen)
        counts = torch.bincount(labels, minlength=data.num_classes)
        if cfg.negatives == "exact" and (self.n_data - counts.max()) < 1:
            raise InputError("gacd: 'exact' negatives need training images of at least two classes")
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("offsets", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("labels", labels, persistent=False)

    def contrast_indices(self, idx: torch.Tensor, y: torch.Tensor, k: int, negatives: str,
                         generator: torch.Generator | None) -> torch.Tensor:
        """[positive, K negatives] per sample: CRD's sample_idx. 'exact' draws the negatives
        uniformly (with replacement) from the pool images of other classes, as CRD's data set."""
        dev = generator.device if generator is not None else idx.device
        r = torch.rand((len(idx), k), generator=generator, device=dev).to(idx.device)
        if negatives == "uniform":
            neg = (r * self.n_data).long().clamp(max=self.n_data - 1)
        else:
            c = self.labels[idx]                       # the pool's labels: real and generated
            others = (self.n_data - self.counts[c])[:, None]
            pos = (r * others).long().clamp(max=others - 1)
            start = self.offsets[c][:, None]
            pos = torch.where(pos >= start, pos + self.counts[c][:, None], pos)
            neg = self.order[pos]
        return torch.cat([idx[:, None], neg], 1)


def sample_weights(t_x: torch.Tensor, y: torch.Tensor, reweight: str) -> torch.Tensor:
    if reweight == "none":
        return torch.ones(len(y), device=y.device)
    if reweight == "teacher_correct":
        return (t_x.argmax(1) == y).float()
    return F.softmax(t_x, 1).gather(1, y[:, None]).squeeze(1)


def gacd_loss(student, teacher, batch, cfg: GacdConfig, step):
    state: GacdState = step.state
    if batch.index is None:
        raise InputError("gacd: batches must carry the images' pool indices (the memory bank rows)")
    x, y, idx = batch.x, batch.y, batch.index.to(batch.x.device)
    with model_modes([teacher], [False]), torch.no_grad(), step.autocast():
        t_x, f_t = teacher(x, return_features=True)
    t_x, f_t = t_x.float(), f_t.float()
    x_adv = kl_or_ce_attack(student, x, y, t_x, cfg, step)
    with step.autocast():
        s_adv, f_s = student(x_adv, return_features=True)
    s_adv, f_s = s_adv.float(), f_s.float()
    contrast_idx = state.contrast_indices(idx, y, cfg.nce_k, cfg.negatives, step.generator)
    out_s, out_t = state.memory(state.embed_s(f_s), state.embed_t(f_t), idx, contrast_idx)
    w = sample_weights(t_x, y, cfg.reweight)
    per = nce_loss_per_sample(out_s, state.n_data) + nce_loss_per_sample(out_t, state.n_data)
    contrast = (w * per).sum() / len(y)
    if cfg.cls_term == "kl":
        cls = kl_per_sample(t_x, s_adv).mean()
    elif cfg.cls_term == "ce":
        cls = F.cross_entropy(s_adv, y)
    else:
        cls = torch.zeros((), device=x.device)
    loss = cfg.contrast_weight * contrast + cfg.cls_weight * cls
    return loss, {"contrast": contrast.detach(), "cls": cls.detach()}


register(Method(
    name="gacd", config=GacdConfig, loss=gacd_loss, role="student",
    summary="GACD: teacher-anchored contrastive feature distillation (CRD-based reconstruction)",
    source="Bai et al., arXiv 2009.09922 (abstract); CRD machinery from HobbitLong/RepDistiller "
           "b84f547 crd/{criterion,memory}.py; docs/methods.md#gacd",
    # labels: the 'exact' negatives (other classes) and the teacher_true_prob reweighting read them;
    # the slides mark GACD x (docs/methods.md, "Labels")
    uses_labels=True, slides_labels=False, reconstruction=True, needs_index=True,
    tiny={"nce_k": 4},   # the memory bank's negatives per sample: passes unchanged
    build_state=lambda cfg, data: GacdState(cfg, data),
    schedules={"cifar10": RECONSTRUCTION_SCHEDULE, "cifar100": RECONSTRUCTION_SCHEDULE}))
