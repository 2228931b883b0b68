"""Presets: ``params/cpu.yaml`` is the whole default profile; every other file of ``params/`` is a
small override of another preset (its ``extends:``, default ``cpu``), merged key by key.

    python -m services.presets cifar10-resnet18            # writes params.yaml (validated first)
    python -m services.presets cifar10-resnet18 --out -    # prints the merged params
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from robustkd.errors import InputError
from robustkd.utils import atomic_path

from .params import load_params

BASE = "cpu"


def preset_names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "params").glob("*.yaml"))


def merge(base: dict, override: dict) -> dict:
    """``override`` on ``base``: mappings merged recursively, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
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
    p.add_argument("name", help="a preset of params/ (cpu, cifar10-resnet18, ...)")
    p.add_argument("--out", default="params.yaml", help="where to write ('-': standard output)")
    p.add_argument("--root", default=".", help="the project directory")
    args = p.parse_args(argv)
    root = Path(args.root)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
