"""CIFAR model zoo: a registry, models that normalise [0, 1] inputs inside, checkpoints.

Architectures follow the reference repositories (kuangliu/pytorch-cifar, TRADES, RSLAD): ResNet-18 with a
3x3 stride-1 stem and no max-pool (11,173,962 parameters for 10 classes), MobileNetV2 for CIFAR
(2,296,922) and WRN-34-10 (46,160,474 parameters used in the forward pass; the reference code's
unused ``sub_block1`` is left out). Width/depth options give small variants for CPU runs. The ViT
teachers of AT-PRM (``vit_b_4``: 85,152,010 parameters for 10 classes; ``deit_s_4``: 21,342,346)
are timm models, robustkd/vit.py.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .utils import atomic_torch_save

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


# ---------------------------------------------------------------- ResNet (CIFAR)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), width=64, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, n in enumerate(blocks):
            planes = width * 2**stage
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def features(self, x):
        """Penultimate features: the globally pooled output of the last stage."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head(self, features):
        return self.linear(features)

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- MobileNetV2 (CIFAR)
class InvertedResidual(nn.Module):
    def __init__(self, in_planes, out_planes, expansion, stride):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    # (expansion, out_planes, num_blocks, stride); second stage stride 1 for CIFAR
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10, width_mult=1.0):
        super().__init__()

        def w(c):
            return max(8, int(round(c * width_mult)))

        self.conv1 = nn.Conv2d(3, w(32), 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w(32))
        layers, in_planes = [], w(32)
        for expansion, out, n, stride in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(in_planes, w(out), expansion, stride if i == 0 else 1))
                in_planes = w(out)
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(in_planes, w(1280), 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w(1280))
        self.linear = nn.Linear(w(1280), num_classes)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head(self, features):
        return self.linear(features)

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- WideResNet
class WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth=34, widen_factor=10, num_classes=10):
        super().__init__()
        if (depth - 4) % 6:
            raise InputError(f"WideResNet depth must be 6k+4, found {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        blocks = []
        for stage in range(3):
            for i in range(n):
                blocks.append(WideBlock(ch[stage] if i == 0 else ch[stage + 1], ch[stage + 1],
                                        (1 if stage == 0 else 2) if i == 0 else 1))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)

    def features(self, x):
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head(self, features):
        return self.fc(features)

    def forward(self, x):
        return self.head(self.features(x))


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


register_model("resnet18", lambda num_classes, width=64, blocks=(2, 2, 2, 2):
               ResNet(tuple(blocks), width, num_classes))
register_model("resnet10", lambda num_classes, width=64, blocks=(1, 1, 1, 1):
               ResNet(tuple(blocks), width, num_classes))
register_model("mobilenetv2", lambda num_classes, width_mult=1.0: MobileNetV2(num_classes, width_mult))
register_model("wrn34_10", lambda num_classes, depth=34, widen_factor=10:
               WideResNet(depth, widen_factor, num_classes))
# Small registered variants for CPU runs.
register_model("resnet10_w8", lambda num_classes: ResNet((1, 1, 1, 1), 8, num_classes))
register_model("resnet10_w16", lambda num_classes: ResNet((1, 1, 1, 1), 16, num_classes))
register_model("resnet18_w16", lambda num_classes: ResNet((2, 2, 2, 2), 16, num_classes))
register_model("wrn16_2", lambda num_classes: WideResNet(16, 2, num_classes))


def _vit_builder(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes, **overrides):
        from .vit import VARIANTS, ViT

        return ViT(VARIANTS[arch][0], num_classes, **overrides)
    return build


# AT-PRM's CIFAR-10 teachers (robustkd/vit.py): ViT-B and DeiT-S at 32 x 32 with 4 x 4 patches, built
# with timm. Options (depth, embed_dim, num_heads) give small variants of the family for CPU tests.
register_model("vit_b_4", _vit_builder("vit_b_4"))
register_model("deit_s_4", _vit_builder("deit_s_4"))


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
        from .utils import load_error_reason

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
