"""The model registry, the ``Classifier`` every model is (``Normalize`` then a backbone) and the
project's checkpoints. Architecture files register themselves here (``robustkd.models``)."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import InputError
from ..utils import atomic_torch_save

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


def save_checkpoint(model: Classifier, path: str | os.PathLike, **meta) -> None:
    """Atomically write architecture name, options, weights and plain metadata."""
    bare = _unwrap(model)
    state = {k: v.detach().cpu() for k, v in bare.state_dict().items()}
    atomic_torch_save({"arch": bare.arch, "options": _plain(bare.options),
                       "state_dict": state, "meta": _plain(meta)}, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", expect_arch: str | None = None
                    ) -> Classifier:
    """Rebuild the model of a checkpoint (``weights_only=True``) and return it in eval mode."""
    if not os.path.exists(path):
        raise InputError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        from ..utils import load_error_reason

        raise InputError(f"checkpoint {path} cannot be read: {load_error_reason(exc, path)}") from None
    missing = {"arch", "options", "state_dict"} - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise InputError(f"checkpoint {path} lacks keys {sorted(missing)}: not a robustkd model checkpoint")
    if expect_arch is not None and ckpt["arch"] != expect_arch:
        raise InputError(f"checkpoint {path} holds architecture {ckpt['arch']!r}, expected {expect_arch!r}")
    options = dict(ckpt["options"])
    num_classes = options.pop("num_classes")
    mean, std = options.pop("mean"), options.pop("std")
    model = create_model(ckpt["arch"], num_classes, mean, std, **options)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path} does not match architecture {ckpt['arch']!r} "
                         f"with options {ckpt['options']}: {exc}") from None
    model.checkpoint_meta = ckpt.get("meta", {})
    return model.eval()


def load_state_into(model: Classifier, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights into an existing model, checking the architecture first."""
    other = load_checkpoint(path, expect_arch=model.arch)
    if other.options != model.options:
        raise InputError(f"checkpoint {path} has options {other.options}, the model {model.options}")
    model.load_state_dict(other.state_dict())


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _plain(value):
    """Metadata restricted to types ``weights_only=True`` loads: no pickled objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return str(value)
