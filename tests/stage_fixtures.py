"""A tiny profile and a tiny ImageFolder tree, for stage and DVC tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Ten classes: AutoAttack's standard version targets nine other classes.
CLASSES = [f"c{i}" for i in range(10)]


def make_image_folder(root: Path, train_per_class=7, test_per_class=3, seed=0, classes=CLASSES):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((32, 32, 3), np.uint8)
                base[..., c % 3] = 60 + 18 * (c % 10)  # a class-dependent colour, so a model can learn something
                img = np.clip(base + rng.integers(0, 90, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def tiny_params(data_root: str) -> dict:
    """The tiny preset (params/tiny.yaml, a profile a person can run too) on the ImageFolder tree at
    ``data_root``."""
    from services.presets import load_preset

    params = load_preset(ROOT, "tiny")
    params["data"]["root"] = data_root
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def sh(cmd, cwd, check=True, env=None):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=env)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def project_copy(tmp: Path, params: dict | None = None) -> Path:
    """The project's git files in ``tmp`` with a tiny ImageFolder and profile, as a fresh git + DVC repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True).stdout.split()
    for f in listed:
        if f.startswith(".dvc/") or f == "dvc.lock" or not (ROOT / f).is_file():
            continue
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tmp / f)
    make_image_folder(tmp / "raw")
    write_params(tmp / "params.yaml", params or tiny_params("raw"))
    sh("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm init", tmp)
    sh("dvc init -q && dvc config core.analytics false && dvc config core.check_update false", tmp)
    return tmp


REPRO_STDOUT = "repro.stdout"   # beside the built project: what its one `dvc repro` printed


def build_tiny_repro(shared: Path) -> Path:
    """``shared/tiny``: the tiny project (:func:`project_copy`) after one ``dvc repro``, committed,
    built once per test session and shared by the xdist workers (a file lock in ``shared``). A
    failed build is recorded, so that a waiting worker fails with its message instead of building
    it again. Tests take copies (:func:`copy_project`), never this folder itself."""
    from filelock import FileLock

    built, failed = shared / "tiny", shared / "tiny.failed"
    with FileLock(str(shared / "tiny.lock")):
        if failed.exists():
            raise AssertionError(f"the shared tiny project failed to build:\n{failed.read_text()}")
        if (shared / REPRO_STDOUT).exists():
            return built
        shutil.rmtree(built, ignore_errors=True)
        built.mkdir(parents=True)
        try:
            project_copy(built)
            out = sh("dvc repro", built).stdout
            sh("git add -A && git -c user.email=t@t -c user.name=t commit -qm 'tiny run'", built)
        except BaseException as exc:
            failed.write_text(str(exc))
            raise
        (shared / REPRO_STDOUT).write_text(out)
        return built


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a built project (git, DVC cache and lock, MLflow store) at ``dest``; its MLflow
    store is made to follow the new folder (services.tracking.relocate_store), so that runs logged
    in the copy keep their artifacts in it."""
    from services.tracking import relocate_store

    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    relocate_store(dest)
    return dest
