"""Clean training without adversarial examples: CE(f(x), y) (the non-robust reference teacher)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .registry import Method, register


@dataclass
class NaturalConfig:
    """No settings."""


def natural_loss(model, teacher, batch, cfg: NaturalConfig, step):
    with step.autocast():
        ce = F.cross_entropy(model(batch.x).float(), batch.y)
    return ce, {"ce": ce.detach()}


register(Method(name="natural", config=NaturalConfig, loss=natural_loss, role="teacher",
                summary="clean cross-entropy training (no adversarial examples)",
                source="standard supervised training"))
