"""Vision Transformers for 32 x 32 images with 4 x 4 patches (AT-PRM's CIFAR-10 teachers), built with
``timm``; ImageNet weights adapted to them; the AT-PRM authors' checkpoints converted.

Source: Mo et al., "When Adversarial Training Meets Vision Transformers" (NeurIPS 2022), official code
mo666666/When-Adversarial-Training-Meets-Vision-Transformers @ b826030ad5c2dce94156d37ebe7f5bb3e4d67d83:
``model_for_cifar/vit.py`` (``vit_base_patch16_224``: embed 768, depth 12, 12 heads) and
``model_for_cifar/deit.py`` (``deit_small_patch16_224``: embed 384, depth 12, 6 heads), both with
qkv bias, LayerNorm eps 1e-6, a CLS token read after the final norm, ``img_size=32, patch_size=4``
(8 x 8 = 64 patch tokens + CLS). Those files are a vendored copy of timm 0.5.4; modern timm's
``VisionTransformer`` has the same parameter names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``,
``head``) and, with no LayerScale and no drop path (``ls1``/``ls2``/``drop_path1``/``drop_path2``
are identities), the same forward. Differences, all without parameters: modern timm's attention
uses ``F.scaled_dot_product_attention`` (the same maths, float rounding aside), and its
from-scratch initialisation is timm 1.x's (``init_weights_vit_timm``).

Like every model of the project, these take [0, 1] pixels and normalise inside
(:class:`robustkd.models.Classifier`); the official data loader's CIFAR-10 statistics
(``utils.py``: mean (0.4914, 0.4822, 0.4465), std (0.2471, 0.2435, 0.2616)) are the project's
``CIFAR10_MEAN``/``CIFAR10_STD``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from .registry import CIFAR10_MEAN, CIFAR10_STD, create_model, register_model

SOURCE = "mo666666/When-Adversarial-Training-Meets-Vision-Transformers@b826030"

# project architecture -> (timm model name, the ImageNet file the official code starts from)
VARIANTS = {
    "vit_b_4": ("vit_base_patch16_224", "jx_vit_base_p16_224-80ecf9dd.pth"),
    "deit_s_4": ("deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth"),
}


class ViT(nn.Module):
    """A timm ``VisionTransformer`` behind the project's backbone interface: ``features`` = the
    pre-logits CLS token (after the final LayerNorm), ``head`` = the linear classifier.

    ``overrides`` are timm keywords (``depth``, ``embed_dim``, ``num_heads``) for small variants of
    the same family (CPU tests); the registered architectures use none."""

    def __init__(self, timm_name: str, num_classes: int, img_size: int = 32, patch_size: int = 4,
                 **overrides):
        super().__init__()
        import timm

        self.timm_name = timm_name
        self.vit = timm.create_model(timm_name, pretrained=False, img_size=img_size, patch_size=patch_size,
                                     num_classes=num_classes, **overrides)

    def features(self, x):
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def head(self, features):
        return self.vit.head(features)

    @property
    def fc(self) -> nn.Module:
        """The classifier layer (``Classifier.feature_dim`` reads its ``in_features``)."""
        head = self.vit.head
        assert isinstance(head, nn.Module)
        return head

    def forward(self, x):
        return self.head(self.features(x))


def is_vit(arch: str) -> bool:
    return arch in VARIANTS


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (timm ``Block``: ``x + attn(norm1(x))``, then the MLP)."""
    from timm.models.vision_transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


# ---------------------------------------------------------------- reading files
def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``.pth``/``.pt``/``.bin``, read with
    ``weights_only=True``): under ``model``, ``state_dict`` or ``model_state_dict`` when present
    (DeiT's files use ``model``), ``module.`` prefixes (DataParallel) stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist")
    if path.suffix == ".npz":
        raise InputError(f"{path}: the original JAX .npz checkpoints are not read here; use timm's PyTorch "
                         "file of the same weights (.pth, .bin or .safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt = load_file(str(path))
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(f"weights file {path} cannot be read: {exc}") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"weights file {path}: expected a state dict, found {type(ckpt).__name__}")
    for key in ("model", "state_dict", "model_state_dict"):
        inner = ckpt.get(key)
        if isinstance(inner, dict):
            ckpt = inner
            break
    state = {}
    for key, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"weights file {path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


def _strict(model_keys: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor], source: str, arch: str,
            allowed_missing: frozenset = frozenset()) -> None:
    unexpected = sorted(k for k in mapped if k not in model_keys)
    missing = sorted(k for k in model_keys if k not in mapped and k not in allowed_missing)
    if unexpected or missing:
        raise InputError(f"{source}: the file's keys do not match architecture {arch!r}: unexpected keys "
                         f"{_few(unexpected)}; missing keys {_few(missing)}")
    shapes = [f"{k}: file {tuple(v.shape)}, model {tuple(model_keys[k].shape)}"
              for k, v in mapped.items() if tuple(v.shape) != tuple(model_keys[k].shape)]
    if shapes:
        raise InputError(f"{source}: tensor shapes differ from architecture {arch!r}: {_few(shapes)}")


def _few(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ---------------------------------------------------------------- ImageNet weights -> 32 x 32, 4 x 4
def sum_pool_patch_kernel(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """(O, I, K, K) -> (O, I, p, p) by summing each (K/p x K/p) block: the official
    ``v.reshape(*v.shape[:2], args.patch, v.shape[2]//args.patch, args.patch,
    v.shape[3]//args.patch).sum(dim=[3,5])`` (``model_for_cifar/vit.py::checkpoint_filter_fn``)."""
    k = weight.shape[-1]
    if k % patch or weight.shape[-2] != k:
        raise InputError(f"patch-embedding kernel {tuple(weight.shape)} is not square or not a multiple of {patch}")
    return weight.reshape(*weight.shape[:2], patch, k // patch, patch, k // patch).sum(dim=[3, 5])


def resize_pos_embed(posemb: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """(1, prefix + G*G, D) -> (1, prefix + grid*grid, D): the prefix (CLS) kept, the grid resized
    bilinearly (``F.interpolate(mode='bilinear')``, align_corners False), as the official
    ``resize_pos_embed`` of ``model_for_cifar/vit.py``."""
    tok, old = posemb[:, :num_prefix], posemb[0, num_prefix:]
    g = int(round(len(old) ** 0.5))
    if g * g != len(old):
        raise InputError(f"position embedding of {len(old)} patch tokens is not a square grid")
    old = old.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    new = F.interpolate(old.float(), size=(grid, grid), mode="bilinear", align_corners=False).to(posemb.dtype)
    return torch.cat([tok, new.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


HEAD_KEYS = ("head.weight", "head.bias")


def adapt_imagenet_state(state: dict[str, torch.Tensor], vit: nn.Module, source: str, arch: str
                         ) -> dict[str, torch.Tensor]:
    """A 224/16 ImageNet state dict (timm key names) adapted to ``vit`` (a timm ViT, 32 x 32, 4 x 4):
    the patch kernel sum-pooled 16 x 16 -> 4 x 4, the position embedding resized 14 x 14 -> 8 x 8
    (CLS kept), the 1000-class head dropped (the model keeps its fresh head, as the official
    ``load_pretrained`` does when ``num_classes`` differs). Every other key must match ``vit``'s,
    shapes included, else an :class:`InputError` names the keys."""
    target = vit.state_dict()
    out = {}
    for key, value in state.items():
        if key in HEAD_KEYS:
            continue
        if key == "patch_embed.proj.weight" and key in target and value.shape != target[key].shape:
            value = sum_pool_patch_kernel(value, target[key].shape[-1])
        elif key == "pos_embed" and key in target and value.shape != target[key].shape:
            prefix = int(getattr(vit, "num_prefix_tokens", 1))
            grid = int(round((target[key].shape[1] - prefix) ** 0.5))
            value = resize_pos_embed(value, grid, prefix)
        out[key] = value
    _strict(target, out, source, arch, allowed_missing=frozenset(HEAD_KEYS))
    return out


def load_imagenet_weights(model, path: str | os.PathLike) -> dict:
    """Initialise a :class:`robustkd.models.Classifier` ViT from local ImageNet weights (see
    :func:`adapt_imagenet_state`); returns what to record about it."""
    from ..engine import array_hash

    if not is_vit(model.arch):
        raise InputError(f"teacher.pretrained {path}: ImageNet weights are adapted to ViT teachers "
                         f"({sorted(VARIANTS)}), not to {model.arch!r}")
    state = read_weights(path)
    vit = model.backbone.vit
    adapted = adapt_imagenet_state(state, vit, f"teacher.pretrained {path}", model.arch)
    vit.load_state_dict({**adapted, **{k: vit.state_dict()[k] for k in HEAD_KEYS}}, strict=True)
    return {"init": "ImageNet weights adapted to 32 x 32 / 4 x 4 patches (head re-initialised)",
            "pretrained": str(path), "pretrained_hash": array_hash(*[state[k] for k in sorted(state)])}


# ---------------------------------------------------------------- AT-PRM checkpoints
def _atprm_arch(state: dict[str, torch.Tensor]) -> str | None:
    w = state.get("cls_token")
    dim = int(w.shape[-1]) if isinstance(w, torch.Tensor) else 0
    return {768: "vit_b_4", 384: "deit_s_4"}.get(dim)


def is_atprm_checkpoint(path: str | os.PathLike) -> bool:
    """True for the official ``train_cifar.py`` format: ``{'state_dict', 'epoch', 'opt'}``."""
    try:
        ckpt = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - the loader reports unreadable files
        return False
    return isinstance(ckpt, dict) and {"state_dict", "epoch", "opt"} <= set(ckpt) and \
        any(str(k).removeprefix("module.").startswith("blocks.") for k in ckpt["state_dict"])


def convert_atprm_checkpoint(path: str | os.PathLike, arch: str | None = None, **options):
    """The AT-PRM authors' checkpoint -> a project model (normalisation inside).

    ``train_cifar.py`` (@ b826030) saves ``{'state_dict': model.state_dict(), 'epoch', 'opt'}``
    of an ``nn.DataParallel`` model (keys ``module.``-prefixed) trained on inputs normalised by the
    data loader with the CIFAR-10 statistics; the model itself does not normalise. The weights load
    strictly into ``timm``'s ViT of the same names; the project model's ``Normalize`` layer takes the
    loader's mean and std, so its logits on [0, 1] images equal the official model's on the
    loader's normalised images. ``arch`` (default: from the embedding width, 768 -> vit_b_4,
    384 -> deit_s_4) and ``options`` select the architecture; the classes come from ``head.weight``."""
    source = f"AT-PRM checkpoint {path}"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{source} cannot be read as a weights-only torch file: {exc}") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)):
        raise InputError(f"{source}: expected train_cifar.py's {{'state_dict', 'epoch', 'opt'}} dict")
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    found = _atprm_arch(state)
    arch = arch or found
    if arch is None or not is_vit(arch):
        raise InputError(f"{source}: cannot tell a ViT-B/DeiT-S from its keys; teacher.model.arch is {arch!r}, "
                         f"expected one of {sorted(VARIANTS)}")
    head = state.get("head.weight")
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) else 10
    model = create_model(arch, num_classes, CIFAR10_MEAN, CIFAR10_STD, **options)
    vit = model.backbone.vit
    _strict(vit.state_dict(), state, f"{source} ({arch} {options})", arch)
    vit.load_state_dict(state, strict=True)
    model.checkpoint_meta = {"format": f"AT-PRM train_cifar.py checkpoint ({SOURCE})", "epoch": ckpt.get("epoch")}
    return model.eval()


def _builder(arch: str):
    def build(num_classes, **overrides):
        return ViT(VARIANTS[arch][0], num_classes, **overrides)
    return build


# AT-PRM's CIFAR-10 teachers: ViT-B and DeiT-S at 32 x 32 with 4 x 4 patches, built with timm.
# Options (depth, embed_dim, num_heads) give small variants of the family for CPU tests.
register_model("vit_b_4", _builder("vit_b_4"))
register_model("deit_s_4", _builder("deit_s_4"))
