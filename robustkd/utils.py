"""Small helpers shared by the core modules: devices, seeds, atomic files, progress."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sized, TypeVar

import torch

from .errors import OutputError

T = TypeVar("T")


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; any torch device string is accepted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) % (2**63))
    return gen


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast where asked for; a no-op context otherwise."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter before 3.13's os)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data to the disk, so that a rename after it survives a power cut."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return   # a folder that cannot be opened (some network file systems): the rename still is atomic
    try:
        os.fsync(fd)
    except OSError:
        pass     # fsync unsupported on this file system
    finally:
        os.close(fd)


def remove_unfinished_writes(path: str | os.PathLike) -> list[Path]:
    """Temporary files that a killed :func:`atomic_path` left next to ``path`` (``.<name>.*.tmp``):
    removed. One process writes a given output at a time (DVC's lock, rank 0 only), so every such
    file is a leftover."""
    path = Path(path)
    leftovers = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    A killed process leaves the previous file intact (rename is atomic on POSIX), and its temporary
    file is removed by the next write of the same file. The data is fsynced before the rename and
    the folder after it, so a power cut leaves the old file or the whole new one. The new file's
    mode follows the umask (0644 under the usual 022), not mkstemp's 0600. A failed write (full disk,
    no permission) raises :class:`~robustkd.errors.OutputError` naming the file and the cause, and
    also leaves the previous file as it was.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_unfinished_writes(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    except OutputError:
        raise
    except OSError as exc:
        kept = "the previous file is kept as it was" if path.exists() else "nothing was written"
        raise OutputError(exc.errno, f"cannot write {path}: {exc.strerror or exc} ({kept})") from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a Python file, so a full disk is an OSError (ENOSPC) naming the cause,
    not the zip writer's 'unexpected pos' RuntimeError."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def load_error_reason(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """One line on why ``torch.load(path, weights_only=True)`` failed: pickled code refused, a
    truncated or corrupt archive, or a file that is not a torch file at all."""
    import pickle
    import re

    text = str(exc)
    try:
        with open(path, "rb") if path is not None else contextlib.nullcontext() as fh:
            zip_file = fh is not None and fh.read(4) == b"PK\x03\x04"
    except OSError:
        zip_file = False
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
        if found:
            return (f"it holds pickled code or objects ({found.group(1)}), refused by "
                    f"torch.load(weights_only=True), which runs no code from a file")
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return f"not a torch checkpoint ({detail.group(1).strip() if detail else 'not a pickle of tensors'})"
    if zip_file or "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
        return "truncated or corrupt (not a complete torch zip archive)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be read ({exc.strerror})"
    return "not a torch checkpoint (neither a torch zip archive nor a pickle of tensors)"


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             every_s: float = 10.0, stream=None) -> Iterator[T]:
    """A log-friendly progress bar: one line every ``every_s`` seconds and one at the end.

    Lines (not carriage returns) so that DVC, Prefect and CI logs stay readable.
    """
    stream = stream or sys.stderr
    total = total if total is not None else (len(iterable) if isinstance(iterable, Sized) else None)
    start = last = time.perf_counter()
    count = 0
    for item in iterable:
        yield item
        count += 1
        now = time.perf_counter()
        if now - last >= every_s or (total is not None and count == total):
            last = now
            rate = count / max(now - start, 1e-9)
            frac = f"{count}/{total} ({100 * count / total:.0f}%)" if total else f"{count}"
            eta = f", eta {(total - count) / rate:.0f}s" if total else ""
            print(f"[{desc}] {frac}, {rate:.2f} it/s{eta}", file=stream, flush=True)
