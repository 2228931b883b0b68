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


def _batched_attack(attack: Callable, x, y, batch_size, device, desc):
    outs, preds = [], []
    batches = range(0, len(x), batch_size)
    for i in progress(batches, total=len(batches), desc=desc):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        xa, pa = attack(xb, yb)
        outs.append(xa.cpu())
        preds.append(pa.cpu())
    return torch.cat(outs), torch.cat(preds)


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, cfg: EvalConfig,
               device) -> torch.Tensor:
    """Per-image correctness under attack ``name``, after the protocol's checks."""
    model.eval()
    gen = make_generator(cfg.seed, device)
    if name == "natural":
        return predict(model, x, cfg.batch_size, device) == y

    if name in ("pgd20", "cw"):
        def attack(xb, yb):
            if name == "pgd20":
                xa = attacks.pgd_ce(model, xb, yb, eps=cfg.eps, alpha=cfg.pgd_step_size,
                                    steps=cfg.pgd_steps, start="uniform", generator=gen)
            else:
                xa = attacks.cw_inf(model, xb, yb, eps=cfg.eps, alpha=cfg.cw_step_size,
                                    steps=cfg.cw_steps, kappa=cfg.cw_kappa, start="uniform", generator=gen)
            with torch.no_grad():
                return xa, model(xa).argmax(1)
        x_adv, pred = _batched_attack(attack, x, y, cfg.batch_size, device, name)
    elif name == "autoattack":
        x_adv, pred = _autoattack(model, x, y, cfg, device)
    else:
        raise InputError(f"unknown attack {name!r}; expected one of {list(ATTACKS)}")

    correct = pred == y
    if cfg.checks:
        check_adversarial(x_adv, x, cfg.eps, name)
        recomputed = predict(model, x_adv, cfg.batch_size, device) == y
        if not torch.equal(recomputed, correct):
            raise EvaluationCheckError(f"{name}: accuracy recomputed from x_adv "
                                       f"({recomputed.float().mean():.4f}) differs from the attack's "
                                       f"own figure ({correct.float().mean():.4f})")
    return correct


def _autoattack(model, x, y, cfg: EvalConfig, device):
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - installed with the pipeline extra
        raise InputError("AutoAttack needs the 'pyautoattack' package (pip install pyautoattack==0.2.0)") from exc
    logging.getLogger("auto-attack").setLevel(logging.INFO)
    adversary = AutoAttack(model, norm="Linf", eps=cfg.eps, version=cfg.autoattack_version,
                           device=device, seed=cfg.seed)
    if len(x) == 0:
        return x.clone(), torch.empty(0, dtype=torch.long)
    x_adv, y_adv = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=cfg.batch_size)
    return x_adv.detach().cpu(), y_adv.detach().cpu()


def check_eps0_equals_natural(model, x, y, cfg: EvalConfig, device, natural: torch.Tensor) -> None:
    """PGD with eps = 0 must leave every prediction, hence the accuracy, as natural."""
    gen = make_generator(cfg.seed, device)

    def attack(xb, yb):
        xa = attacks.pgd_ce(model, xb, yb, eps=0.0, alpha=cfg.pgd_step_size, steps=cfg.check_eps0_steps,
                            start="uniform", generator=gen)
        with torch.no_grad():
            return xa, model(xa).argmax(1)

    _, pred = _batched_attack(attack, x, y, cfg.batch_size, device, "pgd-eps0-check")
    if not torch.equal(pred == y, natural):
        raise EvaluationCheckError(f"PGD with eps=0 gives accuracy {(pred == y).float().mean():.4f}, "
                                   f"natural is {natural.float().mean():.4f}")


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig,
                   device, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Per-image correctness for each configured attack on (x, y), with all checks."""
    model = model.to(device).eval()
    results: dict[str, torch.Tensor] = {}
    for name in cfg.attacks:
        results[name] = run_attack(model, x, y, name, cfg, device)
        log(f"{name}: {100 * results[name].float().mean().item():.2f}% of {len(y)} images")
    if cfg.checks and "natural" in results:
        check_eps0_equals_natural(model, x, y, cfg, device, results["natural"])
    return results


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
