"""The model registry and the ``Classifier`` every model is (``Normalize`` then a backbone).
Architecture files register themselves here (``robustkd.models``); the project's checkpoints:
robustkd/checkpoints.py."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import InputError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std with buffer-held statistics: the model's input is [0, 1] pixels."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std



# ---------------------------------------------------------------- registry
class Classifier(nn.Module):
    """[0, 1] image -> logits: ``Normalize`` then the backbone. Knows how it was built."""

    # Declared for type checkers: nn.Module.__getattr__ is typed ``Tensor | Module``, so submodules and
    # attributes set outside __init__ would read as that union (backbone: see BACKBONES).
    backbone: Any
    checkpoint_meta: dict
    zoo_entry: Any    # a released teacher's robustkd.checkpoints.ZooEntry (load_entry_file)

    def __init__(self, arch: str, options: dict, backbone: nn.Module, mean, std):
        super().__init__()
        self.arch = arch
        self.options = dict(options)
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def features(self, x):
        """Penultimate features (after global pooling) of a [0, 1] image: what the contrastive
        methods (CRD-style GACD) distil. Dimension: ``feature_dim``."""
        return self.backbone.features(self.normalize(x))

    @property
    def feature_dim(self) -> int:
        head = self.backbone.head.__self__
        layer = getattr(head, "linear", None) or getattr(head, "fc")
        return layer.in_features

    def forward(self, x, return_features: bool = False):
        """Logits; with ``return_features`` also the penultimate features, from one forward
        (so DistributedDataParallel and torch.compile, which wrap ``forward``, see both)."""
        feats = self.backbone.features(self.normalize(x))
        logits = self.backbone.head(feats)
        return (logits, feats) if return_features else logits


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict]] = {}


def register_model(name: str, builder: Callable[..., nn.Module], **defaults) -> None:
    _REGISTRY[name] = (builder, defaults)



def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 **options) -> Classifier:
    """Build a registered model taking [0, 1] images. ``options`` are the builder's keywords."""
    if name not in _REGISTRY:
        raise InputError(f"unknown model name {name!r}; expected one of {available_models()}")
    builder, _ = _REGISTRY[name]
    try:
        backbone = builder(num_classes, **options)
    except TypeError as exc:
        raise InputError(f"bad options {options} for model {name!r}: {exc}") from None
    opts = {"num_classes": num_classes, "mean": list(mean), "std": list(std), **options}
    return Classifier(name, opts, backbone, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
