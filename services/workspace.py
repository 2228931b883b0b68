"""Who is working in a project checkout: the Prefect flow's workspace lock and DVC's own lock.

The flow (pipeline/flow.py) holds an exclusive ``flock`` on ``.dvc/tmp/robustkd-flow.lock`` for its
whole run and runs one ``dvc repro`` per stage; ``dvc repro`` and ``dvc exp run`` hold DVC's repo lock
``.dvc/tmp/lock`` (``zc.lockfile``, also an ``flock``) while they run. An experiment run in the
workspace (``dvc exp run -S key=value``) rewrites params.yaml and the outputs, so it must not run
between two stages of a flow; the flow must not start under a running ``dvc repro``/``dvc exp run``.
Experiments run with ``--queue``/``--temp`` work in their own copy (``.dvc/tmp/exps/...``) and
collide with neither.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

FLOW_LOCK = Path(".dvc") / "tmp" / "robustkd-flow.lock"
DVC_LOCK = Path(".dvc") / "tmp" / "lock"
# Set by the flow for its own stage processes (they run while the flow holds its lock).
IN_FLOW_ENV = "ROBUSTKD_IN_FLOW"


def lock_holder(path: Path) -> str | None:
    """None when nobody holds an ``flock`` on ``path``, else the holder's description (the file's
    text, or "a process"). Probes with a non-blocking exclusive lock, released at once."""
    if not path.exists():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            return fh.read().strip() or "a process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def flow_running(root: Path) -> str | None:
    """The running flow that this process is not part of (its lock's text), else None."""
    if os.environ.get(IN_FLOW_ENV):
        return None
    return lock_holder(Path(root) / FLOW_LOCK)


def dvc_running(root: Path) -> str | None:
    """A ``dvc repro``/``dvc exp run`` holding DVC's repo lock in ``root`` (its lock's text), else None."""
    return lock_holder(Path(root) / DVC_LOCK)
