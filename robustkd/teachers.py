"""Teachers from the field: the released robust models of the RobustBench zoo this project knows
(``ZOO``), their download into RobustBench's layout and their loading into the project's own
architectures. The file formats (RobustBench zoo files, the TRADES release) are read in
robustkd/checkpoints.py.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .checkpoints import ZooEntry, load_entry_file, read_state_dict
from .errors import InputError
from .models import Classifier
from .utils import atomic_path

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

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


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise InputError(f"unknown zoo teacher {name!r}; expected one of {sorted(ZOO)}")
    return ZOO[name]


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
