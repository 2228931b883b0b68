"""Every on-disk model format the project reads or writes, in one module (core, torch only).

- The project's checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`): architecture name,
  its options, the weights and plain metadata, read with ``weights_only=True``.
- Released WideResNet files: the RobustBench model zoo and the official TRADES release
  (:class:`ZooEntry` describes one; the zoo's entries and their download: robustkd/teachers.py).
- ViT weights: timm's ImageNet files adapted to 32 x 32 images with 4 x 4 patches, and the AT-PRM
  authors' ``train_cifar.py`` checkpoints (the architectures: robustkd/models/vit.py).
- A given teacher file (``teacher.source: checkpoint``): which of these formats it is
  (:func:`load_given_checkpoint`).

The training state a run resumes from (``checkpoints/``) is the trainer's own
(robustkd/engine.py ``Trainer``), not a model format.

Released WideResNet files: two formats, read without the ``robustbench`` package (its pins
conflict with this stack):

- the RobustBench model zoo, ``{dir}/{dataset}/{threat}/{name}.pt`` (``robustbench/utils.py::
  load_model``, RobustBench/robustbench @ 78fcc9e48a07a861268f295a777b975f25155964): the weights
  under a ``state_dict`` key or the file itself, ``module.`` / ``model.`` prefixes stripped;
- the official TRADES release ``model_cifar_wrn.pt`` (yaodongyu/TRADES README, @
  6e8e11b7c281371c2f027ffadfbaea80361f09de): a plain state dict of ``models/wideresnet.py``'s
  ``WideResNet()`` (WRN-34-10), images in [0, 1], no normalisation.

Both use the TRADES WideResNet's key names (``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,
convShortcut}``, ``bn1``, ``fc``). That class always builds a ``sub_block1`` that its forward
never uses (RobustBench keeps it with ``sub_block1=True`` so the released files load strictly);
its keys are dropped here explicitly. Every other key must map onto the project's
:class:`robustkd.models.WideResNet`, and every key of that model must be filled: otherwise an
:class:`InputError` names the unexpected and the missing keys. BatchNorm's
``num_batches_tracked`` counters (absent from files saved before PyTorch 0.4.1) are the only keys
allowed to be missing; they do not enter the forward pass in eval mode.

The normalisation is the zoo entry's, not the file's: the project's models normalise inside
(``Classifier.normalize``), and a model trained on raw [0, 1] inputs gets mean 0 and std 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .models import CIFAR10_MEAN, CIFAR10_STD, Classifier, create_model
from .models.vit import SOURCE, VARIANTS, is_vit
from .utils import atomic_torch_save, load_error_reason


# ---------------------------------------------------------------- the project's checkpoints
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


def is_robustkd_checkpoint(path: str | os.PathLike) -> bool:
    """True for files written by :func:`save_checkpoint`."""
    try:
        ckpt = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - the caller's loader reports unreadable files
        return False
    return isinstance(ckpt, dict) and {"arch", "options", "state_dict"} <= set(ckpt)


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """None when ``path`` loads with ``weights_only=True``; else one line on why not (missing,
    truncated, pickled code refused), without torch's hint to load it unsafely."""
    if not Path(path).is_file():
        return "the file does not exist"
    try:
        torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        return load_error_reason(exc, path)
    return None


# ---------------------------------------------------------------- released WideResNet files
NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class ZooEntry:
    """A released teacher: where its file lies, how to build it, what it was published with."""

    name: str                   # the RobustBench model name (the file's stem)
    dataset: str                # cifar10 | cifar100
    arch: str                   # a robustkd.models architecture
    options: dict = field(default_factory=dict)   # the architecture's builder keywords
    key_format: str = "trades_wrn"                 # how the file's keys are named
    mean: tuple = NO_NORMALISATION[0]              # the entry's input normalisation
    std: tuple = NO_NORMALISATION[1]
    clean: float = 0.0          # published clean accuracy (%)
    autoattack: float = 0.0     # published AutoAttack accuracy (%)
    eps: str = "8/255"          # the eps of the published robust accuracy
    gdrive_id: str = ""         # the RobustBench download id
    threat: str = "Linf"
    source: str = ""            # where the figures and the architecture were read

    @property
    def num_classes(self) -> int:
        return {"cifar10": 10, "cifar100": 100}[self.dataset]

    def path(self, root: str | os.PathLike) -> Path:
        """RobustBench's layout: ``{root}/{dataset}/{threat}/{name}.pt``."""
        return Path(root) / self.dataset / self.threat / f"{self.name}.pt"


# The official TRADES release, for ``teacher.source: checkpoint`` with a plain state dict.
TRADES_RELEASE = ZooEntry("model_cifar_wrn", "cifar10", "wrn34_10", clean=84.92, autoattack=53.08, eps="0.031",
                          source="yaodongyu/TRADES@6e8e11b: README.md, models/wideresnet.py")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a released file (``weights_only=True``): under ``state_dict`` or
    ``model_state_dict`` when present, else the file itself; ``module.`` then ``model.`` prefixes
    stripped (DataParallel and wrapper modules, as RobustBench's ``load_model`` does)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"teacher file {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        # load_error_reason, not torch's text: that ends with a hint to load with weights_only=False,
        # which would run any code in the file.
        raise InputError(f"teacher file {path} cannot be read as a weights-only torch file: "
                         f"{load_error_reason(exc, path)}") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"teacher file {path}: expected a state dict, found {type(ckpt).__name__}")
    for key in ("state_dict", "model_state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {}
    for key, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"teacher file {path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                             "expected a state dict (optionally under 'state_dict' or 'model_state_dict')")
        for prefix in ("module.", "model."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        state[key] = value
    return state


_TRADES_BLOCK = re.compile(r"^block([123])\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(.+)$")
_DROPPED = re.compile(r"^sub_block1\.")        # built by the TRADES WideResNet, never used in forward
_OPTIONAL = re.compile(r"(^|\.)num_batches_tracked$")


def trades_wrn_to_project(state: dict[str, torch.Tensor], depth: int
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """TRADES/RobustBench WideResNet keys -> :class:`robustkd.models.WideResNet` keys.

    ``block{s}.layer.{i}.X`` -> ``blocks.{(s-1)*n + i}.X`` (``convShortcut`` -> ``shortcut``),
    ``bn1`` -> ``bn``, ``conv1`` and ``fc`` unchanged; ``sub_block1.*`` dropped. Keys that fit no
    rule are returned as the second value, to be reported with the keys the model misses."""
    n = (depth - 4) // 6
    out, unexpected = {}, []
    for key, value in state.items():
        if _DROPPED.match(key):
            continue
        m = _TRADES_BLOCK.match(key)
        if m:
            stage, i, module, rest = int(m[1]), int(m[2]), m[3], m[4]
            if i >= n:
                unexpected.append(key)
                continue
            module = "shortcut" if module == "convShortcut" else module
            out[f"blocks.{(stage - 1) * n + i}.{module}.{rest}"] = value
        elif key.startswith(("conv1.", "fc.")):
            out[key] = value
        elif key.startswith("bn1."):
            out["bn." + key[len("bn1."):]] = value
        else:
            unexpected.append(key)
    return out, unexpected


def project_to_trades_wrn_key(key: str, depth: int) -> str:
    """The file key that :func:`trades_wrn_to_project` maps onto the project's ``key`` (for errors)."""
    n = (depth - 4) // 6
    m = re.match(r"^blocks\.(\d+)\.(bn1|conv1|bn2|conv2|shortcut)\.(.+)$", key)
    if m:
        k, module = int(m[1]), "convShortcut" if m[2] == "shortcut" else m[2]
        return f"block{k // n + 1}.layer.{k % n}.{module}.{m[3]}"
    return "bn1." + key[len("bn."):] if key.startswith("bn.") else key


# key format -> (file keys -> project keys, project key -> file key)
KEY_FORMATS = {"trades_wrn": (trades_wrn_to_project, project_to_trades_wrn_key)}


def load_into(model: Classifier, mapped: dict, unexpected: list[str], source: str,
              file_key=lambda key: key) -> Classifier:
    """Load mapped backbone weights strictly: every key used, every model key filled (except
    BatchNorm's ``num_batches_tracked``), shapes equal; else one error naming the keys in the
    file's terms (``file_key`` maps a model key back)."""
    target = model.backbone.state_dict()
    check_keys(target, mapped, source, f"{model.arch!r} {model.options}", _few, unexpected=unexpected,
               file_key=file_key, optional=lambda k: bool(_OPTIONAL.search(k)))
    filled = {**{k: v for k, v in target.items() if _OPTIONAL.search(k)}, **mapped}
    model.backbone.load_state_dict(filled, strict=True)
    return model


def check_keys(target: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor], source: str, described: str,
               few, order=list, unexpected=(), file_key=lambda key: key, optional=lambda key: False) -> None:
    """Every key of ``mapped`` in ``target`` and every non-``optional`` key of ``target`` in
    ``mapped``, with equal shapes; else one error naming the keys in the file's terms (``file_key``),
    listed by ``few`` in ``order``. The one strict check of every weights format here."""
    unexpected = list(unexpected) + [file_key(k) for k in mapped if k not in target]
    missing = [file_key(k) for k in target if k not in mapped and not optional(k)]
    if unexpected or missing:
        raise InputError(f"{source}: the file's keys do not match architecture {described}: unexpected keys "
                         f"{few(order(unexpected))}; missing keys {few(order(missing))}")
    shapes = [f"{file_key(k)}: file {tuple(v.shape)}, model {tuple(target[k].shape)}"
              for k, v in mapped.items() if tuple(v.shape) != tuple(target[k].shape)]
    if shapes:
        raise InputError(f"{source}: tensor shapes differ from architecture {described}: {few(shapes)}")


def _few(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return str(sorted(keys)[:limit]) + more


def load_entry_file(entry: ZooEntry, path: str | os.PathLike,
                    state: dict[str, torch.Tensor] | None = None) -> Classifier:
    """Build ``entry``'s architecture with ``entry``'s normalisation and load ``path`` (or its
    already read ``state``) into it strictly. Returns the model in eval mode."""
    if entry.key_format not in KEY_FORMATS:
        raise InputError(f"zoo entry {entry.name!r}: unknown key format {entry.key_format!r}")
    model = create_model(entry.arch, entry.num_classes, entry.mean, entry.std, **entry.options)
    state = read_state_dict(path) if state is None else state
    depth = int(entry.options.get("depth", 34))
    to_project, to_file = KEY_FORMATS[entry.key_format]
    mapped, unexpected = to_project(state, depth)
    load_into(model, mapped, unexpected, f"teacher file {path} ({entry.name})",
              file_key=lambda key: to_file(key, depth))
    model.zoo_entry = entry
    return model.eval()


def load_trades_release(path: str | os.PathLike, depth: int = 34, widen_factor: int = 10) -> Classifier:
    """The official TRADES ``model_cifar_wrn.pt`` (or any plain state dict of the TRADES
    WideResNet, 10 or 100 classes as its ``fc.weight`` says): [0, 1] inputs, no normalisation."""
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None and fc.dim() == 2 else 10
    if num_classes not in (10, 100):
        raise InputError(f"teacher file {path}: fc.weight has {num_classes} outputs; expected 10 (CIFAR-10) or 100")
    options = {} if (depth, widen_factor) == (34, 10) else {"depth": depth, "widen_factor": widen_factor}
    entry = ZooEntry(TRADES_RELEASE.name, "cifar100" if num_classes == 100 else "cifar10", "wrn34_10",
                     options=options, clean=TRADES_RELEASE.clean, autoattack=TRADES_RELEASE.autoattack,
                     eps=TRADES_RELEASE.eps, source=TRADES_RELEASE.source)
    return load_entry_file(entry, path, state)


# ---------------------------------------------------------------- ViT weights: reading files
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
    check_keys(model_keys, mapped, source, repr(arch), _first_few, order=sorted,
               optional=lambda k: k in allowed_missing)


def _first_few(keys: list[str], limit: int = 8) -> str:
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
    from .engine import array_hash

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


# ---------------------------------------------------------------- a given teacher file
def load_given_checkpoint(path: str | os.PathLike, arch: str, options: dict) -> tuple[Classifier, dict]:
    """``teacher.source: checkpoint`` (stages/train_teacher.py): the file's format told from its
    content, then read strictly into ``arch`` with ``options`` (``teacher.model``): a robustkd
    checkpoint; else, for a ViT, the AT-PRM authors' ``train_cifar.py`` checkpoint; else the TRADES
    release. Returns the model (eval mode) and what to record of the file's format."""
    where = f"teacher.checkpoint {path}"
    if is_robustkd_checkpoint(path):
        return load_checkpoint(path, expect_arch=arch), {"format": "robustkd"}
    if is_vit(arch):
        # Not a robustkd checkpoint, a ViT: the AT-PRM authors' train_cifar.py format ({'state_dict'
        # of a DataParallel model, 'epoch', 'opt'}, normalisation in the data loader), strictly.
        model = convert_atprm_checkpoint(path, arch, **dict(options))
        return model, {"format": model.checkpoint_meta["format"], "epoch": model.checkpoint_meta["epoch"]}
    unreadable = unreadable_reason(path)
    if unreadable:   # refused or corrupt: say so, not "read as the TRADES release"
        raise InputError(f"{where}: {unreadable}")
    # Not a robustkd checkpoint: the TRADES release format (a plain state dict of TRADES'
    # models/wideresnet.py WideResNet, [0, 1] inputs, no normalisation), into teacher.model.
    if arch != "wrn34_10":
        raise InputError(f"{where}: not a robustkd checkpoint, so read as the TRADES release (a WideResNet "
                         f"state dict), but teacher.model.arch is {arch!r}; expected wrn34_10")
    opts = dict(options)
    unknown = set(opts) - {"depth", "widen_factor"}
    if unknown:
        raise InputError(f"{where}: teacher.model.options {sorted(unknown)} unknown to wrn34_10")
    model = load_trades_release(path, int(opts.get("depth", 34)), int(opts.get("widen_factor", 10)))
    model.options = {**{k: v for k, v in model.options.items() if k in ("num_classes", "mean", "std")}, **opts}
    return model, {"format": "TRADES release (plain WideResNet state dict, no normalisation)"}
