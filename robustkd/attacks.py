"""L-infinity attacks in [0, 1] pixel space: PGD with several losses (optionally returning
the whole path), CW-inf, and DARWIN's two branches advanced together.

All attacks put the attacked models in the mode asked for (``bn_mode``: 'eval' or 'train')
and restore the modes they found. Returned samples are detached.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

EPS_DEFAULT = 8 / 255    # L-inf radius in [0, 1] pixel units: the default of every method and of the evaluation
ALPHA_DEFAULT = 2 / 255  # attack step in [0, 1] pixel units


@contextlib.contextmanager
def model_modes(models: Sequence[nn.Module], training: Sequence[bool]):
    """Temporarily set each model's train/eval mode; restore the previous modes after."""
    before = [m.training for m in models]
    try:
        for m, t in zip(models, training):
            m.train(t)
        yield
    finally:
        for m, t in zip(models, before):
            m.train(t)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers (or the model):
    what checkpoints and copies take. The attacks run :func:`attack_view` instead."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def attack_view(model: nn.Module) -> nn.Module:
    """The model an attack runs: DistributedDataParallel stripped (an input-gradient backward must
    not go through its gradient reducer), the torch.compile wrapper kept, so the attack's forwards
    and backwards run compiled. The Trainer compiles before it wraps in DDP (DDP(compiled)), whose
    ``.module`` is the compiled model; a model compiled around DDP (compiled(DDP)) can only give
    its plain module back."""
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(model, ddp):
        return model.module
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, ddp):
        return inner.module
    return model


@contextlib.contextmanager
def frozen_parameters(*models: nn.Module):
    """Within the block, the parameters of ``models`` that required grad do not; restored after.

    An attack differentiates with respect to its input only. Eager autograd prunes the weight
    gradients of ``torch.autograd.grad(loss, x)`` anyway, but a compiled (AOTAutograd) backward
    computes the gradient of every graph input that requires grad, which about doubles an attack
    step's backward FLOPs. ``.grad`` of the parameters is never touched."""
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Proj(z): clip to the eps-ball around x, then to [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def start_noise(x: torch.Tensor, eps: float, kind: str | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The random start's noise, shaped like ``x``: 'uniform' U(-eps, eps) (PGD, ARD, IAD, DARWIN),
    'normal' 0.001 N(0, 1) (TRADES, RSLAD, AdaAD), None: zeros. Drawn on the generator's device,
    one draw per call, so a caller with the same seeded generator gets the same noise."""
    if kind is None or kind == "none" or eps == 0:
        return torch.zeros_like(x)
    gen_dev = generator.device if generator is not None else x.device
    if kind == "uniform":
        noise = (torch.rand(x.shape, generator=generator, device=gen_dev) * 2 - 1) * eps
    elif kind == "normal":
        noise = 0.001 * torch.randn(x.shape, generator=generator, device=gen_dev)
    else:
        raise InputError(f"unknown random start {kind!r}; expected 'uniform', 'normal' or None")
    return noise.to(x.device, x.dtype)


def random_start(x: torch.Tensor, eps: float, kind: str | None,
                 generator: torch.Generator | None = None, clamp: bool = True) -> torch.Tensor:
    """x + noise (see :func:`start_noise`). ``clamp``: project the start into the eps-ball and
    [0, 1] (evaluation attacks, DARWIN); the baselines' official training attacks take their
    first gradient at the unclamped ``x + noise`` and project only after the step."""
    start = x + start_noise(x, eps, kind, generator)
    return project(start, x, eps) if clamp else start


def kl_per_sample(target_logits: torch.Tensor, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(softmax(target/tau) || softmax(logits/tau)) for each sample, summed over classes."""
    log_p = F.log_softmax(target_logits.float() / tau, dim=1)
    log_q = F.log_softmax(logits.float() / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """-max(z_y - max_{j != y} z_j + kappa, 0) per sample: the loss CW-inf *ascends*.

    The reference implementations' margin loss (docs/methods.md#attacks-and-evaluation, "CW-inf"). Its gradient is the
    margin's until an image is misclassified by ``kappa``; then it is zero. (Clamping the other
    side, max(other - true, -kappa), would give no gradient to confidently correct images.)
    """
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -F.relu(true - other + kappa)


LossFn = Callable[[torch.Tensor], torch.Tensor]  # logits -> per-sample loss to *ascend*


def ascend(loss_at: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, alpha: float,
           steps: int, start: str | None = "uniform", clamp_start: bool = True, return_path: bool = False,
           generator: torch.Generator | None = None, x_start: torch.Tensor | None = None):
    """Projected sign-gradient ascent of ``loss_at(x_adv)`` (a per-sample loss) in the L-inf
    eps-ball around ``x``; the caller sets the models' modes. Every returned sample is detached
    (no ``requires_grad``), so a loss computed on the path never builds input gradients.
    ``x_start`` replaces the random start (a caller that joins batches draws each one's start)."""
    if steps < 0:
        raise InputError(f"attack steps must be >= 0, found {steps}")
    x = x.detach()
    x_adv = random_start(x, eps, start, generator, clamp=clamp_start) if x_start is None else x_start.detach()
    path = []
    with torch.enable_grad():
        for _ in range(steps):
            point = x_adv.detach().requires_grad_(True)
            grad, = torch.autograd.grad(loss_at(point).sum(), point)
            x_adv = project(point.detach() + alpha * grad.sign(), x, eps)
            if return_path:
                path.append(x_adv)
    return path if return_path else x_adv.detach()


def pgd(model: nn.Module, x: torch.Tensor, loss_fn: LossFn, eps: float = EPS_DEFAULT,
        alpha: float = ALPHA_DEFAULT, steps: int = 10, start: str | None = "uniform",
        bn_mode: str = "eval", return_path: bool = False, generator: torch.Generator | None = None,
        autocast=contextlib.nullcontext, clamp_start: bool = True, x_start: torch.Tensor | None = None):
    """Projected sign-gradient ascent of ``loss_fn(model(x_adv))`` in the L-inf eps-ball.

    ``loss_fn`` maps logits to a per-sample loss; its sum is differentiated, so samples are
    independent whenever the model is (eval-mode batch norm). Returns the final sample, or
    with ``return_path`` the list [x(1), ..., x(n)] whose last item is the final sample:
    the path costs no extra forward pass, each point being the output of one step.
    """
    model = attack_view(model)  # compiled kept, DistributedDataParallel's reducer skipped

    def loss_at(point):
        with autocast():
            return loss_fn(model(point))

    with model_modes([model], [bn_mode == "train"]), frozen_parameters(model):
        return ascend(loss_at, x, eps, alpha, steps, start, clamp_start, return_path, generator, x_start)


def pgd_ce(model, x, y, **kw):
    """Untargeted PGD on the cross-entropy (PGD-20 evaluation, PGD-AT, ARD/IAD attacks)."""
    return pgd(model, x, lambda z: F.cross_entropy(z.float(), y, reduction="none"), **kw)


def pgd_kl(model, x, target_logits, **kw):
    """PGD maximising KL(softmax(target) || softmax(model(x_adv))) (TRADES, RSLAD)."""
    target_logits = target_logits.detach()
    return pgd(model, x, lambda z: kl_per_sample(target_logits, z), **kw)


def pgd_targeted(model, x, target, **kw):
    """PGD *descending* the CE towards ``target`` (DARWIN's targeted branch)."""
    return pgd(model, x, lambda z: -F.cross_entropy(z.float(), target, reduction="none"), **kw)


def cw_inf(model, x, y, eps=EPS_DEFAULT, alpha=0.003, steps=30, kappa=50.0, **kw):
    """CW-inf: PGD on the margin loss with kappa (30 steps of 0.003 in the protocol)."""
    return pgd(model, x, lambda z: cw_margin(z, y, kappa), eps=eps, alpha=alpha, steps=steps, **kw)


def dual_branch_paths(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_pair: torch.Tensor,
                      target: torch.Tensor, eps: float = EPS_DEFAULT, alpha: float = ALPHA_DEFAULT,
                      steps: int = 10, start: str | None = "uniform", bn_mode: str = "eval",
                      generator: torch.Generator | None = None, autocast=contextlib.nullcontext,
                      joint: bool = True, clamp_start: bool = True, target_loss: LossFn | None = None
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """DARWIN's two paths, advanced together: the untargeted path from x (ascending CE(., y))
    and the targeted path from the partner x' (descending CE(., target)).

    With eval-mode batch norm both branches go through one batched forward/backward per step
    (samples are independent, so the result equals two separate attacks). With 'train'-mode
    batch norm each branch keeps its own forward, so each is normalised by its own batch.
    ``joint=False`` runs the branches one after the other even in eval mode (faster on CPUs, where
    large batches fall out of cache). ``clamp_start``: see :func:`random_start`. ``target_loss``
    (logits -> per-sample loss) is what the targeted path descends instead of CE(., target).
    Returns ([xh(1)..xh(n)], [xt(1)..xt(n)]).
    """
    b = len(x)
    if bn_mode == "train" or not joint:
        up = pgd_ce(model, x, y, eps=eps, alpha=alpha, steps=steps, start=start, bn_mode=bn_mode,
                    return_path=True, generator=generator, autocast=autocast, clamp_start=clamp_start)
        kw = dict(eps=eps, alpha=alpha, steps=steps, start=start, bn_mode=bn_mode, return_path=True,
                  generator=generator, autocast=autocast, clamp_start=clamp_start)
        if target_loss is None:
            tp = pgd_targeted(model, x_pair, target, **kw)
        else:
            tp = pgd(model, x_pair, lambda z: -target_loss(z), **kw)
        return up, tp
    both_x = torch.cat([x, x_pair])
    labels = torch.cat([y, target])
    sign = torch.cat([torch.ones(b, device=x.device), -torch.ones(len(x_pair), device=x.device)])

    def loss_fn(z):
        if target_loss is not None:
            return torch.cat([F.cross_entropy(z[:b].float(), y, reduction="none"), -target_loss(z[b:])])
        return sign * F.cross_entropy(z.float(), labels, reduction="none")

    # Each branch draws its own start, in the split order: one draw of 2N numbers is not two
    # draws of N on CUDA, and the seed must mean the same starts whichever batching runs.
    both_start = torch.cat([random_start(x, eps, start, generator, clamp=clamp_start),
                            random_start(x_pair, eps, start, generator, clamp=clamp_start)])
    path = pgd(model, both_x, loss_fn, eps=eps, alpha=alpha, steps=steps, start=start, bn_mode=bn_mode,
               return_path=True, generator=generator, autocast=autocast, x_start=both_start)
    return [p[:b] for p in path], [p[b:] for p in path]
