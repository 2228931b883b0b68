"""Robustness evaluation (SPEC.md, "Evaluation protocol"): natural accuracy, PGD-20, CW-inf
and AutoAttack (standard, from ``pyautoattack``), each with the protocol's checks.

Results are per image (a bool "still correct" vector), so a sharded evaluation can gather
them and sum exactly to a single-process run on the same images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from . import attacks
from .errors import InputError
from .utils import make_generator, progress

ATTACKS = ("natural", "pgd20", "cw", "autoattack")


@dataclass
class EvalConfig:
    """Evaluation settings; units of eps and step sizes are [0, 1] pixels."""

    eps: float = 8 / 255
    pgd_steps: int = 20
    pgd_step_size: float = 2 / 255
    cw_steps: int = 30
    cw_step_size: float = 0.003
    cw_kappa: float = 50.0
    autoattack_version: str = "standard"
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    batch_size: int = 256
    seed: int = 0
    checks: bool = True            # the protocol's checks on every evaluation
    check_eps0_steps: int = 2      # steps of the "PGD with eps = 0 equals natural" check

    def __post_init__(self):
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            raise InputError(f"evaluation.attacks: unknown attack(s) {unknown}; expected a subset of {list(ATTACKS)}")


class EvaluationCheckError(AssertionError):
    """An evaluation broke one of the protocol's checks: its figure must not be reported."""


def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            preds.append(model(x[i:i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def check_adversarial(x_adv: torch.Tensor, x: torch.Tensor, eps: float, name: str) -> None:
    dist = (x_adv - x).abs().amax().item() if len(x) else 0.0
    if dist > eps + 1e-6:
        raise EvaluationCheckError(f"{name}: |x_adv - x|_inf = {dist:.6g} exceeds eps {eps:.6g}")
    if len(x) and (x_adv.min() < 0 or x_adv.max() > 1):
        raise EvaluationCheckError(f"{name}: x_adv leaves [0, 1] ({x_adv.min().item()}, {x_adv.max().item()})")


def batch_starts(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Start indices of this rank's evaluation batches: whole batches, dealt round-robin.

    Sharding whole batches, with every batch's randomness seeded by its own index, makes each
    image's result independent of how many ranks share the work: the gathered totals equal a
    single-process run on the same images exactly.
    """
    return list(range(0, n, batch_size))[rank::world_size]


def _batch_seed(seed: int, start: int) -> int:
    return seed * 1_000_003 + start


def _batched_attack(attack: Callable, x, y, starts: list[int], batch_size, device, desc):
    """Run ``attack(xb, yb, batch_seed)`` on each batch of ``starts``; returns (x_adv, pred)."""
    outs, preds = [], []
    for i in progress(starts, total=len(starts), desc=desc):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        xa, pa = attack(xb, yb, i)
        outs.append(xa.cpu())
        preds.append(pa.cpu())
    if not outs:
        return x[:0].clone(), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(preds)


def _select(t: torch.Tensor, starts: list[int], batch_size: int) -> torch.Tensor:
    if not starts:
        return t[:0]
    return torch.cat([t[i:i + batch_size] for i in starts])


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, cfg: EvalConfig,
               device, starts: list[int] | None = None) -> torch.Tensor:
    """Per-image correctness under attack ``name`` on the batches ``starts`` (default: all),
    after the protocol's checks; in the order of ``starts``."""
    model.eval()
    bs = cfg.batch_size
    starts = batch_starts(len(x), bs) if starts is None else starts
    x_mine, y_mine = _select(x, starts, bs), _select(y, starts, bs)
    if name == "natural":
        return predict(model, x_mine, bs, device) == y_mine

    if name in ("pgd20", "cw"):
        def attack(xb, yb, start):
            gen = make_generator(_batch_seed(cfg.seed, start), device)
            if name == "pgd20":
                xa = attacks.pgd_ce(model, xb, yb, eps=cfg.eps, alpha=cfg.pgd_step_size,
                                    steps=cfg.pgd_steps, start="uniform", generator=gen)
            else:
                xa = attacks.cw_inf(model, xb, yb, eps=cfg.eps, alpha=cfg.cw_step_size,
                                    steps=cfg.cw_steps, kappa=cfg.cw_kappa, start="uniform", generator=gen)
            with torch.no_grad():
                return xa, model(xa).argmax(1)
    elif name == "autoattack":
        adversary = _autoattack_adversary(model, cfg, device)

        def attack(xb, yb, start):
            # one call per batch, seeded at each call: a batch's result depends on it alone
            xa, ya = adversary.run_standard_evaluation(xb, yb, batch_size=len(xb))
            return xa.detach(), ya.detach()
    else:
        raise InputError(f"unknown attack {name!r}; expected one of {list(ATTACKS)}")

    x_adv, pred = _batched_attack(attack, x, y, starts, bs, device, name)
    correct = pred == y_mine
    if cfg.checks:
        check_adversarial(x_adv, x_mine, cfg.eps, name)
        recomputed = predict(model, x_adv, bs, device) == y_mine
        if not torch.equal(recomputed, correct):
            raise EvaluationCheckError(f"{name}: accuracy recomputed from x_adv "
                                       f"({recomputed.float().mean():.4f}) differs from the attack's "
                                       f"own figure ({correct.float().mean():.4f})")
    return correct


def _autoattack_adversary(model, cfg: EvalConfig, device):
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - installed with the pipeline extra
        raise InputError("AutoAttack needs the 'pyautoattack' package (pip install pyautoattack==0.2.0)") from exc
    logging.getLogger("auto-attack").setLevel(logging.INFO)
    return AutoAttack(model, norm="Linf", eps=cfg.eps, version=cfg.autoattack_version, device=device,
                      seed=cfg.seed)


def check_eps0_equals_natural(model, x, y, cfg: EvalConfig, device, natural: torch.Tensor,
                              starts: list[int] | None = None) -> None:
    """PGD with eps = 0 must leave every prediction, hence the accuracy, as natural."""
    bs = cfg.batch_size
    starts = batch_starts(len(x), bs) if starts is None else starts

    def attack(xb, yb, start):
        gen = make_generator(_batch_seed(cfg.seed, start), device)
        xa = attacks.pgd_ce(model, xb, yb, eps=0.0, alpha=cfg.pgd_step_size, steps=cfg.check_eps0_steps,
                            start="uniform", generator=gen)
        with torch.no_grad():
            return xa, model(xa).argmax(1)

    _, pred = _batched_attack(attack, x, y, starts, bs, device, "pgd-eps0-check")
    if not torch.equal(pred == _select(y, starts, bs), natural):
        raise EvaluationCheckError(f"PGD with eps=0 gives accuracy {(pred == _select(y, starts, bs)).float().mean():.4f}, "
                                   f"natural is {natural.float().mean():.4f}")


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig,
                   device, log: Callable[[str], None] = print, rank: int = 0,
                   world_size: int = 1) -> dict[str, torch.Tensor]:
    """Per-image correctness for each configured attack on (x, y), with all checks.

    With ``world_size`` > 1 (an initialised process group), each rank attacks its share of
    whole batches and the per-image results are gathered: every rank returns the full vectors,
    equal to a single-process run on the same images.
    """
    model = model.to(device).eval()
    starts = batch_starts(len(x), cfg.batch_size, rank, world_size)
    results: dict[str, torch.Tensor] = {}
    for name in cfg.attacks:
        results[name] = run_attack(model, x, y, name, cfg, device, starts)
    if cfg.checks and "natural" in results:
        check_eps0_equals_natural(model, x, y, cfg, device, results["natural"], starts)
    if world_size > 1:
        results = _gather(results, len(x), cfg.batch_size, world_size)
    for name, correct in results.items():
        log(f"{name}: {100 * correct.float().mean().item():.2f}% of {len(y)} images")
    return results


def _gather(local: dict[str, torch.Tensor], n: int, batch_size: int, world_size: int) -> dict[str, torch.Tensor]:
    from .distributed import all_gather_objects

    gathered = all_gather_objects({k: v.tolist() for k, v in local.items()})
    rank_images = [torch.cat([torch.arange(i, min(i + batch_size, n))
                              for i in batch_starts(n, batch_size, rank, world_size)]
                             or [torch.empty(0, dtype=torch.long)]) for rank in range(world_size)]
    out = {}
    for name in local:
        full = torch.zeros(n, dtype=torch.bool)
        for idx, part in zip(rank_images, gathered):
            full[idx] = torch.tensor(part[name], dtype=torch.bool)
        out[name] = full
    return out


def summarize(results: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy in percent per attack, plus per-class accuracy per attack."""
    out = {"num_images": int(len(labels))}
    for name, correct in results.items():
        out[name] = 100.0 * correct.float().mean().item() if len(correct) else float("nan")
    out["per_class_accuracy"] = {
        name: [100.0 * correct[labels == c].float().mean().item() if (labels == c).any() else None
               for c in range(num_classes)]
        for name, correct in results.items()}
    return out
