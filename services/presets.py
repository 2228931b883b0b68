"""Presets: ``params/cpu.yaml`` is the whole default profile; every other file of ``params/`` is a
small override of another preset (its ``extends:``, default ``cpu``), merged key by key.

    python -m services.presets cifar10-resnet18            # writes params.yaml (validated first)
    python -m services.presets cifar10-resnet18 --out -    # prints the merged params
    python -m services.presets --costs                     # every preset's estimated H200-hours

Selecting a preset also prints its estimated cost (services/costs.py). :func:`smoke` turns a preset
into its smoke run (tests/test_presets.py): the preset's architectures, methods, sources and
schedules, cut to a handful of batches on tiny data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from robustkd.errors import InputError
from robustkd.methods import attack_steps
from robustkd.utils import atomic_path

from .params import load_params

BASE = "cpu"


def preset_names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "params").glob("*.yaml"))


def merge(base: dict, override: dict) -> dict:
    """``override`` on ``base``: mappings merged recursively, anything else replaced; ``null`` over a
    mapping empties it (a preset whose teacher method takes other settings than its base's)."""
    out = dict(base)
    for key, value in override.items():
        if value is None and isinstance(out.get(key), dict):
            out[key] = {}
        else:
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_preset(root: Path, name: str, _seen: tuple = ()) -> dict:
    """The full params of preset ``name`` (its ``extends`` chain merged)."""
    path = root / "params" / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"preset {name!r}: {path} does not exist; presets: {', '.join(preset_names(root))}")
    if name in _seen:
        raise InputError(f"preset {name!r}: 'extends' loops through {list(_seen)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of params sections, found {type(raw).__name__}")
    if name == BASE:
        return raw
    parent = raw.pop("extends", BASE)
    return merge(load_preset(root, parent, _seen + (name,)), raw)


# One epoch of 2 batches of 4 images at a small learning rate: a step at the official lr on 4 images
# can blow the student's logits up to ~1e9, where ONNX Runtime's float32 rounding fails the parity check.
SMOKE_OPTIM = {"epochs": 1, "batch_size": 4, "max_batches": 2, "lr": 0.001, "milestones": []}


def smoke(params: dict, data_root: str) -> dict:
    """``params`` (a merged preset) cut to a smoke run on a CPU: the same architectures, teacher
    source, methods, generated-data recipe and schedules (official ones through
    ``distill.method_optim``), but one epoch of 2 batches of 4 images (lr 0.001), 2-step attacks, the tiny
    ImageFolder tree at ``data_root`` (as many classes as the preset's data: CIFAR's are read the same
    way once prepared), evaluation on its first 2 test images with AutoAttack cut to APGD-CE with 2
    iterations and the masking checks to one image and step, no network, on the CPU."""
    p = merge(params, {
        "data": {"source": "imagefolder", "root": data_root, "download": False, "train_per_class": None,
                 "heldout_per_class": 0, "test_per_class": None},
        "teacher": {"zoo": {"download": False}, "monitor_pgd_steps": 0, "optim": SMOKE_OPTIM},
        "ddpm": {"num_images": 0},
        "distill": {"optim": SMOKE_OPTIM, "official_epochs": 1, "monitor_pgd_steps": 0},
        "evaluate": {"per_class": None, "autoattack_per_class": None, "max_images": 2,
                     "config": {"pgd_steps": 2, "cw_steps": 2, "batch_size": 4, "autoattack_version": "custom",
                                "autoattack_attacks": ["apgd-ce"], "autoattack_iterations": 2,
                                "masking_images": 1, "unbounded_steps": 1, "sweep_eps": [0.0, 8 / 255],
                                "sweep_steps": 1}},
        "export": {"per_class": None, "latency_batch_sizes": [1], "latency_repeats": 1, "parity_atol": 1e-3},
        "run": {"device": "cpu", "nproc_per_node": 1, "nnodes": 1, "compile": False},
        "attention": {"images": 1},
    })
    if short := attack_steps(p["teacher"]["method"], 1):   # methods without attack steps: as they are
        p["teacher"]["settings"] = {**(p["teacher"].get("settings") or {}), **short}
    settings = p["distill"].get("settings") or {}
    for method in (p["distill"]["method"], p["distill"]["reference_method"]):
        if short := attack_steps(method, 2):
            settings[method] = {**(settings.get(method) or {}), **short}
        p["distill"].setdefault("method_optim", {})[method] = {
            **(p["distill"]["method_optim"].get(method) or {}), **SMOKE_OPTIM}
    p["distill"]["settings"] = settings
    p["profile"] = f"smoke-{p.get('profile', 'custom')}"
    return p


def cost_line(root: Path, name: str) -> str:
    """One line: the preset's estimated training cost on one H200 (services/costs.py)."""
    from .costs import describe, estimate

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(load_preset(root, name), sort_keys=False))
        params = load_params(Path(tmp) / "params.yaml")
    if params.data.source not in ("cifar10", "cifar100"):
        return f"{name}: {params.data.source} data of this machine: no GPU estimate (a CPU profile)"
    return describe(name, estimate(params))


def preset_text(root: Path, name: str) -> str:
    """The merged preset as YAML, validated as a params.yaml before anyone writes it."""
    text = f"# Generated from params/{name}.yaml by `python -m services.presets {name}`.\n" + \
        yaml.safe_dump(load_preset(root, name), sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(text)
        load_params(Path(tmp) / "params.yaml")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="a preset of params/ (cpu, cifar10-resnet18, ...)")
    p.add_argument("--costs", action="store_true", help="print every preset's estimated cost and exit")
    p.add_argument("--out", default="params.yaml", help="where to write ('-': standard output)")
    p.add_argument("--root", default=".", help="the project directory")
    args = p.parse_args(argv)
    root = Path(args.root)
    if args.costs or not args.name:
        if not args.costs:
            p.error("name a preset, or --costs")
        for name in preset_names(root):
            print(cost_line(root, name))
        return 0
    try:
        if args.name == BASE:   # the base keeps its comments: copied as it is
            text = (root / "params" / f"{BASE}.yaml").read_text()
            load_params(root / "params" / f"{BASE}.yaml")
        else:
            text = preset_text(root, args.name)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with atomic_path(Path(args.out)) as tmp:
            tmp.write_text(text)
        print(f"{args.out}: preset {args.name}")
        print("estimated cost: " + cost_line(root, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
