"""Stage fingerprint_data: a hash of the raw data that ``prepare_data`` reads, in
``data/raw_fingerprint.json``, and of the generated-data files that ``ingest_ddpm`` reads
(``ddpm.files`` or the diffusers folder), in ``data/ddpm_fingerprint.json``.

The raw data may live outside the project (the default ``../shared/datasets/cifar10``), where
DVC's temporary experiment workspaces (``dvc exp run --temp`` / ``--queue``) cannot see it as a
dependency. This stage always runs (``always_changed``), lists the files under ``data.root``
(relative path, size and modification time) and writes their hash; ``prepare_data`` depends on
that file, so it re-runs exactly when the raw data changes, from any workspace. It is
deliberately not an MLflow run: it records nothing but the hash.

Being the first stage of every ``dvc repro`` and ``dvc exp run``, it also refuses (exit 2, one line)
to start a run in the project's own workspace while a Prefect flow runs there (services/workspace.py):
such a run would rewrite params.yaml and the outputs between two stages of the flow. Queued and
temporary experiments (``.dvc/tmp/exps/...``) have their own workspace and are not refused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from robustkd.errors import InputError

from services.common import check_data_root, data_root, project_dir, write_json
from services.params import load_params
from services.workspace import flow_running

OUT = Path("data") / "raw_fingerprint.json"
GENERATED_OUT = Path("data") / "ddpm_fingerprint.json"


def fingerprint(root: Path) -> dict:
    """{"files": n, "bytes": total, "sha256": hash of the sorted (path, size, mtime) listing}."""
    if not root.exists():   # a torchvision source that prepare_data will download
        return {"files": 0, "bytes": 0, "sha256": "absent"}
    digest, files, total = hashlib.sha256(), 0, 0
    if root.is_file():      # a CIFAR archive named directly by data.root
        st = root.stat()
        digest.update(f"{root.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"files": 1, "bytes": st.st_size, "sha256": digest.hexdigest()}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.stat()
            digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files, total = files + 1, total + st.st_size
    return {"files": files, "bytes": total, "sha256": digest.hexdigest()}


def generated_fingerprint(source: str, files: list[str], model_dir: str) -> dict:
    """The same kind of hash of what ``ingest_ddpm`` reads: each file of ``ddpm.files``
    (``source: npz``) or the local diffusers pipeline folder (``source: diffusers``). ``ddpm.files``
    is a list of paths in params.yaml, which DVC cannot declare one by one as dependencies; hashing
    them here makes ``ingest_ddpm`` re-run when a file's content is replaced under the same name."""
    if source == "npz":
        return {"source": "npz", "files": {str(f): fingerprint(Path(f)) for f in files}}
    if source == "diffusers":
        return {"source": "diffusers", "model_dir": fingerprint(Path(model_dir))}
    return {"source": source}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    here = Path.cwd().resolve()
    holder = flow_running(here) if project_dir(here) == here else None
    if holder:
        print(f"error: a Prefect flow is running in {here} ({holder}); this `dvc repro`/`dvc exp run` would change "
              "its params and outputs under it: wait for it, or run the experiment in its own workspace "
              "(`dvc exp run --queue` then `dvc queue start`, or `dvc exp run --temp`)", file=sys.stderr)
        return 2
    try:
        params = load_params(args.params)
        root = data_root(params.data.root)
        check_data_root(root, params.data.source, params.data.download)
        record = fingerprint(root)
        generated = generated_fingerprint(params.ddpm.source, params.ddpm.files, params.ddpm.diffusers.model_dir)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(record, OUT)   # the data alone: the same hash from any workspace
    write_json(generated, GENERATED_OUT)
    print(f"{root}: {record['files']} files, sha256 {record['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
