"""Teachers from the field: released robust models loaded into the project's own architectures.

Two file formats, read without the ``robustbench`` package (its pins conflict with this stack):

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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .models import Classifier, create_model
from .utils import atomic_path, load_error_reason

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
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


_RB = "RobustBench/robustbench@78fcc9e: model_zoo/{}.py, model_info/{}/Linf/{}.json"

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    # The slides' CIFAR-10 teacher: the TRADES release (RobustBench re-hosts it). Figures at eps
    # 0.031 (RobustBench's footnote: "= 7.9/255 instead of 8/255").
    ZooEntry("Zhang2019Theoretically", "cifar10", "wrn34_10", clean=84.92, autoattack=53.08, eps="0.031",
             gdrive_id="1hPz9QQwyM7QSuWu-ANG_uXR-29xtL8t_",
             source=_RB.format("cifar10", "cifar10", "Zhang2019Theoretically")),
    # CIFAR-100 WRN-34-10 teachers (the slides' CIFAR-100 "WRN-34 TRADES" teacher, 60.04 / 27.38, is not
    # released): LBGAT (the closest figures) and LTD (AdaAD's CIFAR-100 teacher). Same architecture
    # class as above with sub_block1=True, no normalisation.
    ZooEntry("Cui2020Learnable_34_10_LBGAT6", "cifar100", "wrn34_10", clean=60.64, autoattack=29.33,
             eps="0.031", gdrive_id="1TfIgvW3BAkL8jL9J7AAWFSLW3SSzJ2AE",
             source=_RB.format("cifar100", "cifar100", "Cui2020Learnable_34_10_LBGAT6")),
    ZooEntry("Chen2021LTD_WRN34_10", "cifar100", "wrn34_10", clean=64.07, autoattack=30.59,
             gdrive_id="1-I4NZyULdEWH46b4EaCTxuuRo4eFXsg_",
             source=_RB.format("cifar100", "cifar100", "Chen2021LTD_WRN34_10")),
]}

# The official TRADES release, for ``teacher.source: checkpoint`` with a plain state dict.
TRADES_RELEASE = ZooEntry("model_cifar_wrn", "cifar10", "wrn34_10", clean=84.92, autoattack=53.08, eps="0.031",
                          source="yaodongyu/TRADES@6e8e11b: README.md, models/wideresnet.py")


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise InputError(f"unknown zoo teacher {name!r}; expected one of {sorted(ZOO)}")
    return ZOO[name]


# ---------------------------------------------------------------- reading files
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


def is_robustkd_checkpoint(path: str | os.PathLike) -> bool:
    """True for files written by :func:`robustkd.models.save_checkpoint`."""
    try:
        ckpt = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - the caller's loader reports unreadable files
        return False
    return isinstance(ckpt, dict) and {"arch", "options", "state_dict"} <= set(ckpt)


# ---------------------------------------------------------------- key mapping
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
    unexpected = list(unexpected) + [file_key(k) for k in mapped if k not in target]
    missing = [file_key(k) for k in target if k not in mapped and not _OPTIONAL.search(k)]
    if unexpected or missing:
        raise InputError(f"{source}: the file's keys do not match architecture {model.arch!r} "
                         f"{model.options}: unexpected keys {_few(unexpected)}; missing keys {_few(missing)}")
    shapes = [f"{file_key(k)}: file {tuple(v.shape)}, model {tuple(target[k].shape)}"
              for k, v in mapped.items() if tuple(v.shape) != tuple(target[k].shape)]
    if shapes:
        raise InputError(f"{source}: tensor shapes differ from architecture {model.arch!r} {model.options}: "
                         f"{_few(shapes)}")
    filled = {**{k: v for k, v in target.items() if _OPTIONAL.search(k)}, **mapped}
    model.backbone.load_state_dict(filled, strict=True)
    return model


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


# ---------------------------------------------------------------- the zoo directory
def gdrive_url(entry: ZooEntry) -> str:
    return f"https://drive.google.com/uc?id={entry.gdrive_id}"


def missing_file_message(entry: ZooEntry, root: str | os.PathLike) -> str:
    return (f"zoo teacher {entry.name!r}: file {entry.path(root)} does not exist. On a machine without "
            f"network, download it elsewhere ({gdrive_url(entry)}, or RobustBench's "
            f"load_model({entry.name!r}, dataset={entry.dataset!r}) which saves it under "
            f"models/{entry.dataset}/{entry.threat}/) and copy it to that path")


def download(entry: ZooEntry, root: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Fetch ``entry``'s file from Google Drive into the zoo layout (atomically), where a network
    exists; a clear :class:`InputError` saying where to place the file otherwise."""
    path = entry.path(root)
    if path.is_file():
        return path
    if not entry.gdrive_id:
        raise InputError(missing_file_message(entry, root))
    url = f"https://drive.usercontent.google.com/download?id={entry.gdrive_id}&export=download&confirm=t"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                while chunk := response.read(1 << 20):
                    fh.write(chunk)
            try:
                read_state_dict(tmp)
            except InputError:  # an HTML page (download quota, consent) is not a checkpoint
                raise InputError(f"the download of zoo teacher {entry.name!r} from {url} is not a torch "
                                 "checkpoint (a Google Drive quota or consent page?). "
                                 + missing_file_message(entry, root)) from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise InputError(f"cannot download zoo teacher {entry.name!r} from {url}: {exc}. "
                         + missing_file_message(entry, root)) from None
    return path


def load_zoo_teacher(name_or_entry: str | ZooEntry, root: str | os.PathLike,
                     allow_download: bool = False) -> Classifier:
    """A zoo teacher from ``{root}/{dataset}/{threat}/{name}.pt``, downloaded first when
    ``allow_download`` and the file is absent."""
    entry = name_or_entry if isinstance(name_or_entry, ZooEntry) else zoo_entry(name_or_entry)
    path = entry.path(root)
    if not path.is_file():
        if not allow_download:
            raise InputError(missing_file_message(entry, root))
        download(entry, root)
    return load_entry_file(entry, path)
