"""A straightforward DARWIN step written directly from the formulas of docs/methods.md.

Every branch and every path point gets its own forward pass, and the weights w(.|.) get their
own forward passes too. It is slow on purpose: the tests check the project's
:func:`robustkd.methods.darwin.darwin_loss` against it (tests/methods/test_darwin.py), and the
benchmark measures the speed-up (benchmarks/bench.py). A test oracle, not part of the core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustkd.attacks import kl_per_sample, model_modes, project, random_start
from robustkd.methods.darwin import DarwinConfig, triplet


def _path(student, start_img, label, cfg: DarwinConfig, ascend: bool, generator):
    x = start_img.detach()
    z = random_start(x, cfg.eps, "uniform" if cfg.random_start else None, generator)
    path = []
    for _ in range(cfg.steps):
        z.requires_grad_(True)
        loss = F.cross_entropy(student(z), label, reduction="sum")
        grad, = torch.autograd.grad(loss, z)
        step = cfg.step_size * grad.sign()
        z = project(z.detach() + (step if ascend else -step), x, cfg.eps)
        path.append(z)
    return path


def _weight(student, teacher, point, clean, label, i, cfg: DarwinConfig):
    if cfg.weighting == "uniform":
        return torch.ones(len(label))
    with torch.no_grad():
        p_t = F.softmax(teacher(clean) / cfg.tau, 1).gather(1, label[:, None]).squeeze(1)
        p_s = F.softmax(student(point) / cfg.tau, 1).gather(1, label[:, None]).squeeze(1)
        gap = (p_t - p_s).abs()
        second = gap / gap.max() if gap.max() > 0 else torch.zeros_like(gap)
        return (1 - cfg.gamma) * i / cfg.steps + cfg.gamma * second


def darwin_loss_reference(student, teacher, x, y, x_pair, y_pair, cfg: DarwinConfig, generator=None):
    n = cfg.steps
    mode = student.training
    teacher.eval()
    if cfg.label_free:
        with torch.no_grad():
            y, y_pair = teacher(x).argmax(1), teacher(x_pair).argmax(1)
    with model_modes([student], [cfg.attack_bn_mode == "train"]), torch.enable_grad():
        path_u = _path(student, x, y, cfg, True, generator)
        path_t = _path(student, x_pair, y, cfg, False, generator) if cfg.use_dbkd else []
    student.train(mode)

    def t(z):
        with torch.no_grad():
            return teacher(z)

    arkd = kl_per_sample(t(x), student(x), cfg.tau).mean() \
        + cfg.beta * kl_per_sample(t(path_u[-1]), student(path_u[-1]), cfg.tau).mean()
    iakd = torch.zeros(())
    if cfg.use_iakd:
        for i in range(1, n):
            w = _weight(student, teacher, path_u[i - 1], x, y, i, cfg)
            iakd = iakd + (w * kl_per_sample(t(path_u[i - 1]), student(path_u[i - 1]), cfg.tau)).mean()
    dbkd = torch.zeros(())
    if cfg.use_dbkd:
        for i in range(1, n + 1):
            xh, xt = path_u[i - 1], path_t[i - 1]
            w_u = _weight(student, teacher, xh, x, y, i, cfg)
            w_t = _weight(student, teacher, xt, x_pair, y_pair, i, cfg)
            dbkd = dbkd + (w_u * triplet(t(x), student(xh), student(xt), cfg.margin, cfg.distance, cfg.tau)).mean()
            dbkd = dbkd + (w_t * triplet(t(x_pair), student(xt), student(xh), cfg.margin, cfg.distance, cfg.tau)).mean()
    loss = arkd + cfg.lambda_iakd * iakd + cfg.lambda_dbkd * dbkd
    return loss, {"arkd": arkd.detach(), "iakd": iakd.detach(), "dbkd": dbkd.detach()}
