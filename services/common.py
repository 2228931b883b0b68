"""Helpers shared by the stage CLIs: paths, params, atomic JSON/CSV/arrays, the per-epoch
history writer, and the one way every CLI reports bad input (message, exit code 2)."""

from __future__ import annotations

import argparse
import dataclasses
import csv
import functools
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from robustkd.data import ImageSet, load_npz, to_chw_tensor
from robustkd.errors import InputError, NonFiniteLoss, OutputError
from robustkd.utils import atomic_path, select_device

from .params import Params, load_params
from .tracking import stage_run

# Fixed output locations shared with dvc.yaml.
PREPARED = Path("data/prepared")
GENERATED = Path("data/generated")
MODELS = Path("models")
METRICS = Path("metrics")
CHECKPOINTS = Path("checkpoints")
REPORTS = Path("reports")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return p


def cli(main: Callable[[argparse.Namespace], None], build: Callable[[], argparse.ArgumentParser],
        stage: str, sections: tuple[str, ...] = (), config: Path | None = None):
    """Run a stage main inside its MLflow stage run (``args.tracker``; see services/tracking.py).

    ``config``: where the stage's resolved configuration goes (``metrics/<name>_config.json``,
    :func:`write_stage_config`) once ``main`` has succeeded; ``main`` may name another file
    (``args.config_path``: distill's ``--name``, ``--out-dir``) or none (``--download-only``).

    Bad input prints one clear line and exits 2 (no traceback); so do a failed write (full disk,
    no permission: the previous outputs are kept) and a NaN/inf training loss (epoch and batch
    named, the last good checkpoint kept), with exit 1. Only rank 0 of a distributed
    run (``RANK`` set by torchrun) records anything.
    """

    @functools.wraps(main)
    def entry(argv=None):
        args = build().parse_args(argv)
        try:
            params = load_params(args.params)
            if getattr(args, "method", None):  # --method: the method that runs is the one recorded
                params = dataclasses.replace(params, distill=dataclasses.replace(params.distill, method=args.method))
            if getattr(args, "variant", None):  # --variant: a DARWIN ablation (ablation/dvc.yaml)
                from .params import with_ablation

                if getattr(args, "method", None) not in (None, "darwin"):
                    raise InputError(f"--variant {args.variant} is a DARWIN ablation; --method {args.method} contradicts it")

                params = with_ablation(params, args.variant)
            if getattr(args, "seed", None) is not None:  # --seed (the comparison's seeds): recorded as run.seed
                params = dataclasses.replace(params, run=dataclasses.replace(params.run, seed=args.seed))
            args.loaded_params = params
            args.config_path = config
            with stage_run(stage, params, sections, enabled=int(os.environ.get("RANK", "0")) == 0) as tracker:
                args.tracker = tracker
                main(args)
                write_stage_config(args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except (OutputError, NonFiniteLoss) as exc:
            print(f"error: {exc.strerror if isinstance(exc, OutputError) else exc}", file=sys.stderr)
            raise SystemExit(1) from None
    return entry


def write_stage_config(args) -> None:
    """The stage's resolved configuration (services.tracking.stage_config: the tracker's ``config``,
    the same values its MLflow run logged as params), written atomically to ``args.config_path``,
    once, by rank 0, after the stage's own outputs (a failed stage leaves the previous file)."""
    path = getattr(args, "config_path", None)
    if path is None or getattr(args, "config_written", False) or int(os.environ.get("RANK", "0")) != 0:
        return
    write_json(args.tracker.config, path)
    args.config_written = True


def project_dir(cwd: Path | None = None) -> Path:
    """The project's directory, also from inside DVC's temporary experiment workspaces
    (``dvc exp run --temp`` and ``--queue`` run in ``<project>/.dvc/tmp/exps/...``)."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def data_root(root: str) -> Path:
    """``data.root``: ``ROBUSTKD_DATA_ROOT`` when set; a relative path is relative to the project
    (docs/pipeline.md#what-make-run-does: the default profile reads CIFAR-10 from
    ../shared/datasets/cifar10), wherever the stage runs."""
    chosen = Path(os.environ.get("ROBUSTKD_DATA_ROOT") or root)
    if chosen.is_absolute() or (Path.cwd() / chosen).exists():
        return chosen
    return project_dir() / chosen


def check_data_root(root: Path, source: str, download: bool) -> None:
    """The data must be there before anything runs, unless a torchvision source will download it:
    the error names the key, the folder and the two ways to fix it."""
    if root.exists() or (source != "imagefolder" and download):
        return
    if source == "imagefolder":
        raise InputError(f"data.root {root} does not exist: expected an ImageFolder tree there (train/<class>/*.png, "
                         f"test/<class>/*.png); set data.root to your copy, or use `data.source: cifar10` "
                         f"(with `data.download: true`) to download CIFAR-10 into it")
    raise InputError(f"data.root {root} does not exist and data.download is false: expected the {source} "
                     f"archive or its folder there; set data.download: true to download it")


def setup_run(params: Params) -> torch.device:
    if params.run.threads:
        torch.set_num_threads(params.run.threads)
    return select_device(params.run.device)


def setup_distributed(params: Params):
    """(DistInfo, device): joins torchrun's process group when there is one."""
    from robustkd.distributed import init_distributed

    setup_run(params)  # threads
    return init_distributed(params.run.device, params.run.backend)


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def save_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """An uncompressed .npz (plain arrays, no pickle), written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def save_imageset(data: ImageSet, path: str | os.PathLike) -> None:
    save_arrays(path, image=data.images.permute(0, 2, 3, 1).numpy(), label=data.labels.numpy(),
                classes=np.array(data.classes))


def load_imageset(path: str | os.PathLike) -> ImageSet:
    images, labels = load_npz(path)
    with np.load(path, allow_pickle=False) as npz:
        classes = [str(c) for c in npz["classes"]] if "classes" in npz.files else \
            [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(to_chw_tensor(images), torch.from_numpy(labels.astype(np.int64)), classes)


class HistoryWriter:
    """Per-epoch callback: rewrites the CSV history and the JSON of the latest metrics."""

    def __init__(self, csv_path: Path, json_path: Path, extra: dict | None = None):
        self.csv_path, self.json_path = csv_path, json_path
        self.rows: list[dict] = []
        self.extra = extra or {}

    def __call__(self, epoch: int, metrics: dict) -> None:
        self.rows.append(dict(metrics))
        self.flush()

    def flush(self) -> None:
        write_csv(self.rows, self.csv_path)
        write_json({**self.extra, **(self.rows[-1] if self.rows else {})}, self.json_path)

    def load_previous(self, history: list[dict]) -> None:
        """After a resume: keep the epochs trained before the kill."""
        self.rows = [dict(h) for h in history]


def heldout_monitor(heldout: ImageSet | None, device: torch.device, pgd_steps: int, eps: float,
                    step_size: float, seed: int):
    """Per-epoch natural and PGD accuracy on the held-out slice (None when there is none), with the
    library's evaluation attacks (``robustkd.evaluation.run_attack``: no checks, the figures of
    a monitor, not of the protocol)."""
    if heldout is None or len(heldout) == 0:
        return None
    from robustkd.data import to_float
    from robustkd.evaluation import EvalConfig, run_attack

    x, y = to_float(heldout.images), heldout.labels
    cfg = EvalConfig(eps=eps, pgd_steps=pgd_steps, pgd_step_size=step_size, attacks=["natural", "pgd20"],
                     batch_size=256, seed=seed, checks=False)

    def evaluate(model) -> dict:
        nat = run_attack(model, x, y, "natural", cfg, device)
        adv = run_attack(model, x, y, "pgd20", cfg, device)
        return {"heldout_natural": 100.0 * nat.float().mean().item(),
                f"heldout_pgd{pgd_steps}": 100.0 * adv.float().mean().item()}

    return evaluate


def read_params(args) -> Params:
    """The params ``cli`` already loaded for this run (loaded here when called outside it)."""
    return getattr(args, "loaded_params", None) or load_params(args.params)
