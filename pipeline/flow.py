"""The Prefect flow over the DVC pipeline: one task per DVC stage, MLflow parent run, registry.

    python -m pipeline.flow                                  # the pipeline of params.yaml
    python -m pipeline.flow --preset cifar10-resnet18        # run with a preset's params
    python -m pipeline.flow --methods darwin rslad ard       # and compare these methods

Each task runs ``dvc repro --single-item STAGE``, so DVC still skips what is up to date and owns
the caching; Prefect owns the order, the logs (every line of the stage's output) and the retries.
Only transient failures are retried (a killed process, a held DVC lock, a locked database): a bad
input or a bug fails the same way twice and is not retried.

One flow at a time per workspace: a second one refuses with one line naming the first (or waits
for it, ``--wait-lock SECONDS``), before it touches params.yaml, dvc.lock, the MLflow store or the
registry.

All stage runs of one flow run nest in MLflow under one parent run, tagged with the git commit
and the Prefect flow run. The last task registers the exported ONNX student (pipeline/registry.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run as current_flow_run

from typing import Literal

from robustkd.errors import InputError
from services.common import check_data_root, data_root
from services.params import DISTILL_METHODS, load_params
from services.presets import preset_names
from services.workspace import FLOW_LOCK, IN_FLOW_ENV, dvc_running
from services.tracking import DEFAULT_EXPERIMENT, git_commit, run_url, setup_mlflow, tracking_enabled, tracking_uri

from . import registry

# Output of a stage that failed for a reason that may not recur: worth a retry.
TRANSIENT_PATTERNS = [
    r"exited with -9\b", r"exited with 137\b", r"exited with -15\b", r"exited with 143\b",  # killed
    r"Unable to acquire lock", r"is busy, it is being blocked by", r"database is locked", r"Connection (refused|reset)",
    r"Temporary failure in name resolution", r"CUDA error: (launch failure|unspecified)",
]


# DVC's hints after every stage (git add, auto staging, dvc push): said once at the end of the flow.
DVC_HINT = re.compile(r"^(To track the changes with git, run:|To enable auto staging, run:|git add |"
                      r"dvc config core\.autostage|Use `dvc push` to send your updates)")
DVC_LOCK_HELD = re.compile(r"Unable to acquire lock|is busy, it is being blocked by")


class WorkspaceBusy(RuntimeError):
    """Another flow holds this workspace (params.yaml, dvc.lock, the MLflow store, the registry)."""


_HELD: dict[str, int] = {}


@contextlib.contextmanager
def workspace_lock(root: Path, wait_s: float = 0.0):
    """One flow at a time in a workspace: an exclusive lock on ``.dvc/tmp/robustkd-flow.lock``,
    held for the whole flow. DVC's own lock covers one ``dvc repro`` only, and a flow runs one per
    stage: between two of them a second flow could swap params.yaml or reproduce stages under the
    first one. A second flow waits up to ``wait_s`` seconds, then refuses with one line naming the
    holder. It does not start either while a `dvc repro` or a workspace `dvc exp run` holds DVC's lock
    (services/workspace.py). Re-entrant within a process (``main`` takes it before the Prefect flow does)."""
    import fcntl

    path = Path(root).resolve() / FLOW_LOCK
    key = str(path)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                busy = f"another flow is running in {Path(root).resolve()} ({fh.read().strip() or 'a process'})"
            else:
                # a `dvc repro` or a workspace `dvc exp run` started outside any flow: its stages would
                # interleave with the flow's and it reads params.yaml, which a flow may swap
                dvc = dvc_running(Path(root).resolve())
                if not dvc:
                    break
                fcntl.flock(fh, fcntl.LOCK_UN)
                busy = (f"a DVC command (`dvc repro` or `dvc exp run`) is running in {Path(root).resolve()} "
                        f"(DVC's lock: {' '.join(dvc.split())})")
            if time.monotonic() >= deadline:
                waited = f"waited {wait_s:g} s; " if wait_s else ""
                raise WorkspaceBusy(f"{busy}; {waited}this one did not start (--wait-lock SECONDS waits for it)")
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))
        fh.seek(0)
        fh.truncate()
        fh.write(f"flow pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, transient: bool, tail: str):
        kind = "transient failure, retried" if transient else "not retried: the same input fails again"
        super().__init__(f"stage {stage!r} failed (dvc exit {returncode}; {kind}):\n{tail}")
        self.stage, self.returncode, self.transient = stage, returncode, transient


def is_transient_output(output: str) -> bool:
    return any(re.search(p, output) for p in TRANSIENT_PATTERNS)


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry a StageFailed marked transient, nothing else."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:  # noqa: BLE001 - any other error is not a transient stage failure
        return False
    return False


def main_stages(root: Path) -> list[str]:
    """The stages of dvc.yaml in file order (which is the pipeline's order)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def compare_stages(methods: list[str], seeds: list[int] = (0,)) -> list[str]:
    """The comparison's stages in order: compare/dvc.yaml's matrix names them ``<method>-<seed>``."""
    runs = [f"{m}-{s}" for m in methods for s in seeds]
    return ([f"compare/dvc.yaml:distill@{r}" for r in runs]
            + [f"compare/dvc.yaml:evaluate@{r}" for r in runs] + ["compare/dvc.yaml:table"])


def stage_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a stage: this interpreter's bin first (dvc.yaml says ``python``)."""
    # IN_FLOW_ENV: the flow's own stages run while it holds the workspace lock (stages/fingerprint_data.py)
    env = {**os.environ, **extra, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", IN_FLOW_ENV: "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc_executable() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_only_transient, task_run_name="{stage}")
def run_stage(stage: str, root: str, env: dict[str, str]) -> dict:
    """``dvc repro --single-item STAGE``, streaming its output into the Prefect log."""
    return repro_stage(stage, root, env, get_run_logger().info)


def repro_stage(stage: str, root: str, env: dict[str, str], log) -> dict:
    """``dvc repro --single-item STAGE`` with each output line passed to ``log``; a failure is a
    :class:`StageFailed` (DVC's lock held by another DVC process: one line saying so, transient)."""
    start = time.perf_counter()
    proc = subprocess.Popen([dvc_executable(), "repro", "--single-item", stage], cwd=root, env=stage_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: deque[str] = deque(maxlen=40)
    ran = False
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if DVC_HINT.match(line.strip()):
                continue
            if line:
                log(line)
                tail.append(line)
                ran |= line.startswith("Running stage")
        rc = proc.wait()
    finally:
        stop_child(proc)   # the flow stopped (killed, interrupted): its stage does not go on as an orphan
    if rc != 0:
        text = "\n".join(tail)
        if DVC_LOCK_HELD.search(text):
            text = (f"the DVC lock of {root} is held by another DVC process (a flow or a `dvc repro` in this "
                    f"workspace); DVC said: {next(x for x in tail if DVC_LOCK_HELD.search(x)).strip()[:200]}")
        raise StageFailed(stage, rc, is_transient_output(text), text)
    return {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - start, 1)}


def stop_child(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate a stage process that is still running (SIGTERM, then SIGKILL after ``grace_s``)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def close_stale_flow_runs(client, experiment_id: str, root: Path, log=print) -> list[str]:
    """MLflow parent runs of earlier flows of this workspace still RUNNING, and their stage runs, are
    ended as KILLED. Called while the workspace lock is held: no other flow can be running here, so a
    RUNNING one is a flow that was killed before it could end its run."""
    workspace = str(Path(root).resolve())
    stale = client.search_runs([experiment_id], filter_string="tags.stage = 'flow' and attributes.status = 'RUNNING'",
                               max_results=1000)
    closed = []
    for run in stale:
        if run.data.tags.get("workspace") != workspace:
            continue   # another clone's flow (a shared tracking server): not ours to close
        children = client.search_runs([experiment_id], max_results=1000, filter_string=(
            f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'"))
        for child in children:
            client.set_terminated(child.info.run_id, status="KILLED")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
        log(f"tracking: the MLflow run {run.info.run_id} of an earlier flow here was still RUNNING (that flow "
            f"was killed); ended as KILLED with {len(children)} stage run(s)")
    return closed


class Stopped(SystemExit):
    """SIGTERM or SIGHUP reached the flow: it ends its MLflow run as KILLED and stops its stage."""


def stop_on_signals() -> None:
    """Turn SIGTERM/SIGHUP into :class:`Stopped` in the main thread, so the flow's ``finally`` runs."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise Stopped(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


@task(task_run_name="register-student")
def register_student(root: str, parent_run_id: str | None) -> dict:
    logger = get_run_logger()
    version, decision = registry.register_workspace(Path(root), parent_run_id=parent_run_id, log=logger.info)
    return {"version": version, "alias": decision.alias if decision else None,
            "reason": decision.reason if decision else "this ONNX file is already registered (its aliases unchanged)"}


def registry_line(registered: dict | None) -> str:
    """"version 3 (champion): <why>"; a file registered before keeps its aliases (not re-ranked)."""
    if not registered:
        return "not registered"
    alias = f" ({registered['alias']})" if registered["alias"] else ""
    return f"version {registered['version']}{alias}: {registered['reason']}"


def preset_params(root: Path, preset: str) -> dict:
    """The full params of a preset of params/ (its ``extends`` chain merged)."""
    from services.presets import load_preset

    return load_preset(root, preset)


def run_params(root: Path, preset: str | None, methods: list[str] | None, seed: int | None = None) -> bytes | None:
    """The params of this flow run as YAML text, validated; None when params.yaml is used as is."""
    if not preset and not methods and seed is None:
        return None
    raw = preset_params(root, preset) if preset else yaml.safe_load((root / "params.yaml").read_text())
    if methods:
        if not isinstance(raw.get("compare"), dict):
            raise ValueError(f"{root / 'params.yaml'}: no 'compare:' section to set the methods of")
        raw["compare"]["methods"] = list(methods)
    if seed is not None:
        raw.setdefault("run", {})["seed"] = int(seed)
    text = yaml.safe_dump(raw, sort_keys=False).encode()
    load_params_text(text)   # validated before it is ever in place
    return text


def load_params_text(text: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_bytes(text)
        return load_params(Path(tmp) / "params.yaml")


@contextlib.contextmanager
def params_for_this_run(root: Path, text: bytes | None):
    """DVC reads params.yaml: this run's params stand in for it while the stages run, and the
    file's own bytes come back afterwards, whatever happens (tracked params.yaml never changes)."""
    if text is None:
        yield
        return
    path = root / "params.yaml"
    original = path.read_bytes()
    try:
        atomic_write(path, text)
        yield
    finally:
        atomic_write(path, original)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.flow.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def download_if_needed(root: Path) -> None:
    if load_params(root / "params.yaml").data.source != "imagefolder":  # dvc.yaml depends on data.root
        subprocess.run([sys.executable, "-m", "stages.prepare_data", "--download-only"], cwd=root,
                       env=stage_env({"ROBUSTKD_TRACKING": "off"}), check=True)



# The choices a deployment's form offers (Prefect builds its parameter schema from the annotations):
# the presets of this checkout's params/ folder and the registry's distillation methods.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PresetName = Literal[tuple(preset_names(PROJECT_ROOT)) or ("cpu",)]  # type: ignore[valid-type]
MethodName = Literal[DISTILL_METHODS]  # type: ignore[valid-type]

@flow(name="robustkd-pipeline", log_prints=True)
def robustkd_pipeline(preset: PresetName | None = None, methods: list[MethodName] | None = None,  # type: ignore[valid-type]
                      seed: int | None = None,
                      register_model: bool = True, project_dir: str = ".", wait_lock_s: float = 0.0) -> dict:
    """Run the DVC pipeline stage by stage (and the method comparison when ``methods`` is given),
    then register the ONNX student. The result links the run's MLflow parent run.

    Args:
        preset: A preset of params/ (cpu, cifar10-resnet18, ...) used for this run instead of
            params.yaml, which is left as it is. Empty: params.yaml as it is.
        methods: Distillation methods to compare on the same teacher and test images after the main
            pipeline (the comparison pipeline, compare/dvc.yaml), e.g. darwin, rslad, ard. Empty:
            no comparison.
        seed: run.seed for this run (initial weights, data order, attacks' random starts). Empty:
            the seed of params.yaml or the preset.
        register_model: Register the exported ONNX student in the MLflow model registry; the
            champion alias moves only to a version at least as robust under AutoAttack.
        project_dir: The project checkout the stages run in (its DVC cache, params and MLflow store).
        wait_lock_s: One flow at a time per workspace: when another flow runs there, wait this many
            seconds for it, then refuse with a message naming it (0: refuse at once).
    """
    root = Path(project_dir).resolve()
    with workspace_lock(root, wait_lock_s), params_for_this_run(root, run_params(root, preset, methods, seed)):
        if preset:
            download_if_needed(root)
        summary = run_pipeline(root, preset, methods, register_model, seed)
    link_mlflow_run(summary)
    return summary


def mlflow_run_url(run_id: str, experiment_id: str, tracking: str | None = None) -> str:
    """The MLflow UI's page of a run (services/tracking.py ``run_url``, shared with the report)."""
    return run_url(run_id, experiment_id, tracking)


def link_mlflow_run(summary: dict) -> None:
    """Prefect artifacts of the flow run: a link to its MLflow parent run and a summary table
    (shown in the flow run's Artifacts tab and returned in the result)."""
    if not summary.get("parent_run_id"):
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    url = summary["mlflow_run_url"]
    create_link_artifact(link=url, link_text=f"MLflow run {summary['parent_run_id']}", key="mlflow-parent-run",
                         description="The MLflow parent run of this flow run: every stage's run nests under it.")
    rows = "\n".join(f"| {r['stage']} | {'ran' if r['ran'] else 'up to date'} |" for r in summary["stages"])
    registered = summary.get("registered") or {}
    create_markdown_artifact(key="pipeline-summary", description="Stages and registry of this flow run", markdown=(
        f"MLflow parent run: [{summary['parent_run_id']}]({url})\n\n| stage | outcome |\n|---|---|\n{rows}\n\n"
        f"Registry: {registered.get('version', '-')} ({registered.get('alias', '-')}: {registered.get('reason', '-')})"))


def run_pipeline(root: Path, preset: str | None, methods: list[str] | None, register_model: bool,
                 seed: int | None = None) -> dict:
    params = load_params(root / "params.yaml")
    stages = main_stages(root) + (compare_stages(methods, params.compare.seeds) if methods else [])
    env = {"MLFLOW_TRACKING_URI": tracking_uri(root)}
    results: list[dict] = []
    parent_id = None
    if tracking_enabled():
        # The parent run is created with the client, not made "active": the stage processes and
        # the registration open their own runs under it.
        mlflow = setup_mlflow(root)
        env["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"])
        close_stale_flow_runs(client, experiment.experiment_id, root)
        parent = client.create_run(experiment.experiment_id, run_name=f"flow {current_flow_run.name or ''}".strip(),
                                   tags={"git_commit": git_commit(root), "stage": "flow", "profile": params.profile,
                                         "prefect_flow_run_id": str(current_flow_run.id or ""),
                                         "workspace": str(root.resolve())})
        parent_id = parent.info.run_id
        env["ROBUSTKD_PARENT_RUN_ID"] = parent_id
        for key, value in {"preset": preset or "-", "methods": ",".join(methods or []) or "-",
                           "seed": params.run.seed, "stages": ",".join(stages)}.items():
            client.log_param(parent_id, key, value)
    status = "FAILED"
    try:
        for stage in stages:
            results.append(run_stage(stage, str(root), env))
        registered = register_student(str(root), parent_id) if register_model else None
        status = "FINISHED"
    except (KeyboardInterrupt, Stopped):
        status = "KILLED"
        raise
    finally:
        if parent_id is not None:
            client.set_terminated(parent_id, status=status)
    summary = {"parent_run_id": parent_id, "stages": results, "registered": registered,
               "mlflow_run_url": mlflow_run_url(parent_id, experiment.experiment_id, env["MLFLOW_TRACKING_URI"])
               if parent_id is not None else None}
    # one line each, wrapped to a terminal's width (issue 28: the end of `make run` is read by people)
    for line in (f"stages run: {', '.join(r['stage'] for r in results if r['ran']) or 'none'}",
                 f"up to date: {', '.join(r['stage'] for r in results if not r['ran']) or 'none'}",
                 "registry: " + registry_line(registered)):
        print(textwrap.fill(line, 120, subsequent_indent="  "))
    if any(r["ran"] for r in results):
        print("dvc.lock records this run: `git add dvc.lock metrics` to keep it with the code")
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="run with params/PRESET.yaml (params.yaml is left as it is)")
    p.add_argument("--methods", nargs="+", help="also run the comparison of these methods")
    p.add_argument("--seed", type=int, help="run.seed for this run (params.yaml is left as it is)")
    p.add_argument("--no-register", action="store_true", help="do not register the ONNX student")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                   help="when another flow runs in this workspace: wait this long for it (default: refuse at once)")
    args = p.parse_args(argv)
    stop_on_signals()
    try:
        root = Path(args.project_dir)
        # A user error in the params is one line before Prefect, DVC or MLflow start (nothing written).
        text = run_params(root, args.preset, args.methods, args.seed)
        params = load_params_text(text) if text is not None else load_params(root / "params.yaml")
        with contextlib.chdir(root):
            check_data_root(data_root(params.data.root), params.data.source, params.data.download)
        with workspace_lock(root, args.wait_lock):  # refused before Prefect starts
            robustkd_pipeline(preset=args.preset, methods=args.methods, seed=args.seed,
                              register_model=not args.no_register, project_dir=args.project_dir,
                              wait_lock_s=args.wait_lock)
    except (StageFailed, WorkspaceBusy, ValueError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
