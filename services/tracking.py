"""MLflow tracking of stage runs behind a small interface.

Every stage CLI opens ``stage_run(...)``; it yields a :class:`Tracker` whose ``epoch_callback``
plugs into the training engine's per-epoch callbacks (so metrics are logged live while a model
trains) and whose ``log_*`` methods record params, metrics and artifacts. The core library never
sees MLflow: it only calls callbacks.

Settings (environment variables, so ``dvc repro``, the Prefect flow and a shell behave alike):

- ``MLFLOW_TRACKING_URI``: where runs go. Default: ``sqlite:///<project>/mlflow.db``, where
  ``<project>`` is ``DVC_ROOT`` (set by DVC for stage commands) or the working directory. A server
  URI (``http://127.0.0.1:5000``) works the same.
- ``MLFLOW_EXPERIMENT_NAME``: the experiment (default ``robustkd``).
- ``ROBUSTKD_PARENT_RUN_ID``: set by the Prefect flow; stage runs nest under that parent run.
- ``ROBUSTKD_TRACKING=off``: no tracking at all (a :class:`NullTracker`).
- ``ROBUSTKD_TRACKING_ATTEMPTS`` (default 3) and ``ROBUSTKD_TRACKING_TIMEOUT_S`` (default 10, the
  bound of one request): an unreachable server or a locked store is tried that many times, with
  waits of 1, 2, 4 ... s in between; then the stage goes on untracked and says so in one line (a
  store lost in the middle of a run: the rest of the run untracked, the training goes on).

Each run is tagged with the DVC stage (``DVC_STAGE``, set by DVC; else the stage's own name), the
git commit of the project and the params profile.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

DEFAULT_EXPERIMENT = "robustkd"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


# MLflow 3's UI opens in its GenAI view (traces, token usage) unless a page is asked for in the
# model-training view, where the runs, their metrics and the model registry are in the sidebar.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def experiments_url(base: str) -> str:
    """The MLflow UI's experiment list at ``base``, in the model-training view."""
    return f"{base.rstrip('/')}/#/experiments{MODEL_TRAINING_VIEW}"


def run_url(run_id: str, experiment_id: str, tracking: str | None = None) -> str:
    """The MLflow UI's page of a run: on the tracking server when runs go to one (``tracking``,
    default MLFLOW_TRACKING_URI), else on the UI of ``make mlflow-ui`` (``ROBUSTKD_MLFLOW_UI``,
    default http://127.0.0.1:5000) over the project's own store."""
    tracking = tracking or tracking_uri()
    base = tracking if tracking.startswith(("http://", "https://")) else \
        os.environ.get("ROBUSTKD_MLFLOW_UI", "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{MODEL_TRAINING_VIEW}"


def tracking_enabled() -> bool:
    return os.environ.get("ROBUSTKD_TRACKING", "on").lower() not in ("off", "0", "false", "no")


# What DVC itself rewrites while the pipeline runs (locks, declared outputs): not a code change.
PIPELINE_WRITES = ("dvc.lock", "compare/dvc.lock", "metrics/", "reports/", "models/", "data/", "checkpoints/")


def git_commit(root: Path | None = None) -> str:
    """The project's commit, with ``-dirty`` when tracked files other than the pipeline's own
    records (dvc.lock, the outputs) differ ('unknown' outside git)."""
    cwd = str(root or project_root())
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                 capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    paths = [line[3:].split(" -> ")[-1] for line in changed if line.strip()]
    dirty = [p for p in paths if not (p in PIPELINE_WRITES or p.startswith(tuple(PIPELINE_WRITES)))]
    return sha + ("-dirty" if dirty else "")


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """Nested params -> {"distill.optim.lr": "0.1", ...} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = str(obj)[:6000]
    return out


def numeric_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, with nested keys joined by '/'."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numeric_metrics(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


_CURRENT: list = []


def current() -> "NullTracker":
    """The tracker of the stage run in progress (a NullTracker outside one)."""
    return _CURRENT[-1] if _CURRENT else NullTracker()


def plain(obj):
    """``obj`` as JSON holds it (tuples as lists, paths and other objects as their text): the
    config file and the MLflow params are then written from the same values."""
    return json.loads(json.dumps(obj, default=str))


def merge(into: dict, part: dict) -> dict:
    """``part`` merged into ``into`` (nested dicts merged key by key, other values replaced)."""
    for k, v in part.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
    return into


class NullTracker:
    """Tracking switched off (or a non-zero rank of a distributed run): records nothing in MLflow.

    ``config``: every params dict the stage logged, merged (:func:`merge`, JSON values): the stage's
    resolved configuration, written beside its outputs (services.common.write_stage_config), the
    same whether the run is tracked or not."""

    run_id: str | None = None
    experiment_id: str | None = None

    def __init__(self) -> None:
        self.config: dict = {}

    def log_params(self, params: dict) -> None:
        merge(self.config, plain(params))

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        pass

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_imageset(self, data, path, split: str, context: str, tags: dict | None = None) -> None:
        """Record a prepared image set as an input of the run (``mlflow.log_input``)."""

    def epoch_callback(self, epoch: int, metrics: dict) -> None:
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)


def _attempts() -> int:
    return max(1, int(os.environ.get("ROBUSTKD_TRACKING_ATTEMPTS", "3")))


HTTP_BOUNDS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def bound_mlflow_requests() -> None:
    """MLflow's own HTTP client retries 7 times with growing waits and a 120 s timeout per
    request (minutes against a dead server): one try per request of at most
    ``ROBUSTKD_TRACKING_TIMEOUT_S`` here, the retries are :func:`with_retries`'. Settings the user
    made are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", os.environ.get("ROBUSTKD_TRACKING_TIMEOUT_S", "10"))


def short_error(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


# The store is away or busy (worth a retry, then going on untracked); any other error is a bug
# or a rejected value and propagates as before.
UNAVAILABLE = ("database is locked", "database table is locked", "unable to open database", "Connection refused",
               "Connection reset", "Max retries exceeded", "timed out", "Temporary failure in name resolution",
               "Name or service not known", "RemoteDisconnected", "status code 502", "status code 503",
               "status code 504", "disk I/O error")


# The store's file is damaged: no retry helps, but the stage's own work must not be lost to it, so it
# is treated as unavailable (one line, the stage goes on untracked) without the waits.
CORRUPT = ("database disk image is malformed", "file is not a database", "malformed database schema")


def store_corrupt(exc: BaseException) -> bool:
    return any(p in f"{exc}" for p in CORRUPT)


def store_unavailable(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return (isinstance(exc, (ConnectionError, TimeoutError)) or any(p in text for p in UNAVAILABLE)
            or store_corrupt(exc))


def filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter (``name = {filter_literal(x)}``).

    MLflow's parser (mlflow/utils/search_utils.py, ``_strip_quotes``) takes a value in single or
    double quotes and strips them without unescaping, so a value is quoted with the kind it does not
    hold; one holding both, a backslash or a control character cannot be written and is refused
    (a name pasted into the filter unquoted could change the query)."""
    value = str(value)
    if "\\" in value or any(ord(c) < 32 for c in value) or ("'" in value and '"' in value):
        raise ValueError(f"{value!r} cannot be written as an MLflow search filter value "
                         "(it holds both quote kinds, a backslash or a control character)")
    return f'"{value}"' if "'" in value else f"'{value}'"


def with_retries(fn, attempts: int | None = None):
    """``fn()``, tried ``attempts`` times with waits of 1, 2, 4 ... s while the store is
    unavailable (:func:`store_unavailable`); the last error is raised."""
    attempts = attempts or _attempts()
    for k in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, database is locked, ...
            if k == attempts - 1 or not store_unavailable(exc) or store_corrupt(exc):
                raise
            time.sleep(2 ** k)


def say_untracked(what: str, exc: BaseException) -> None:
    if store_corrupt(exc):
        print(f"tracking: {what} at {tracking_uri()} failed: the store is damaged ({short_error(exc)}); "
              f"move that file aside to start a new store; the stage goes on untracked", file=sys.stderr, flush=True)
        return
    print(f"tracking: {what} at {tracking_uri()} failed {_attempts()} times ({short_error(exc)}); "
          f"the stage goes on untracked", file=sys.stderr, flush=True)


class MlflowTracker(NullTracker):
    """Logs to MLflow; a store lost during the run (after the retries) turns it into a
    NullTracker for the rest of the run, with one line: the training is never stopped by it."""

    def __init__(self, mlflow_module, run_id: str, experiment_id: str | None = None):
        super().__init__()
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.lost: str | None = None

    def _call(self, what: str, fn) -> None:
        if self.lost:
            return
        try:
            with_retries(fn)
        except Exception as exc:  # noqa: BLE001
            if not store_unavailable(exc):
                raise
            self.lost = short_error(exc)
            say_untracked(what, exc)

    def log_params(self, params: dict) -> None:
        params = plain(params)
        super().log_params(params)
        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._call("logging params", lambda chunk=dict(items[i:i + 100]): self._mlflow.log_params(chunk))

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        values = numeric_metrics(metrics, prefix)
        if values:
            self._call("logging metrics", lambda: self._mlflow.log_metrics(values, step=step))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._call("logging artifacts", lambda: self._mlflow.log_artifacts(str(path), artifact_path))
        elif path.is_file():
            self._call("logging an artifact", lambda: self._mlflow.log_artifact(str(path), artifact_path))

    def set_tags(self, tags: dict) -> None:
        self._call("setting tags", lambda: self._mlflow.set_tags({k: str(v) for k, v in tags.items()}))

    def log_imageset(self, data, path, split: str, context: str, tags: dict | None = None) -> None:
        """``mlflow.log_input`` of a prepared image set (data/prepared/<split>.npz), named after
        its split: its digest is the first 16 hex digits of the data card's sha256
        (metrics/data_card.json, the same hash of images and labels), so every stage that reads
        the same images logs the same dataset; the full hash and the image count are input tags;
        ``context``: training, validation or testing (MLflow's "Datasets used" of the run)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        from robustkd.data import imageset_sha256

        sha = imageset_sha256(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "can be interpreted in multiple ways": a local file either way
            source = resolve_dataset_source(str(Path(path).resolve()))
        self._mlflow.log_input(MetaDataset(source=source, name=split, digest=sha[:16]), context=context,
                               tags={"sha256": sha, "num_images": str(len(data)),
                                     **{k: str(v) for k, v in (tags or {}).items()}})


@contextlib.contextmanager
def keep_environment(*names: str):
    """Undo what MLflow writes into os.environ (it exports MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_ID on set_*): the next project in the same process, or a child process,
    must choose its store from the user's settings, not from the previous project's."""
    saved = {n: os.environ.get(n) for n in names}
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def relocate_store(root: Path) -> str | None:
    """Make the project's SQLite store follow a moved project folder; returns the old folder.

    MLflow keeps absolute artifact locations (it resolves relative ones on purpose), under
    ``<project>/mlruns``. When the experiments' locations name another folder than ``root``, every
    text cell of the store that starts with the old folder is rewritten to the new one, so runs,
    artifacts and registered models of a moved or copied workspace open again."""
    import re
    import sqlite3

    db = root / "mlflow.db"
    if not db.is_file():
        return None
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type = 'table'")]
        if "experiments" not in tables:
            return None
        olds = {m.group(2) for (loc,) in con.execute("select artifact_location from experiments")
                if loc and (m := re.match(r"^(file://)?(/.*)/mlruns(/[^/]+)?/?$", loc))}
        new = str(root.resolve())
        moved = sorted(o for o in olds if o != new)
        for old in moved:
            for table in tables:
                cols = [c[1] for c in con.execute(f'pragma table_info("{table}")')
                        if (c[2] or "").upper().startswith(("VARCHAR", "TEXT"))]
                for col in cols:
                    con.execute(f'update "{table}" set "{col}" = replace("{col}", ?, ?) where "{col}" like ?',
                                (old + "/", new + "/", f"%{old}/%"))
        con.commit()
        return moved[0] if moved else None
    finally:
        con.close()


def setup_mlflow(root: Path | None = None):
    """Import MLflow, point it at the tracking URI and experiment; returns the module. The
    project's own store follows a moved project folder (:func:`relocate_store`)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        relocate_store(Path(root or project_root()))
    import mlflow

    own_store = not os.environ.get("MLFLOW_TRACKING_URI")   # read before MLflow exports it
    with keep_environment(*MLFLOW_ENV):
        mlflow.set_tracking_uri(tracking_uri(root))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        if own_store:
            ensure_project_experiment(mlflow, name, root or project_root())
        mlflow.set_experiment(name)
    return mlflow


def ensure_project_experiment(mlflow, name: str, root: Path) -> None:
    """Create the project's experiment with its artifacts under ``<project>/mlruns``: MLflow's
    default is ``./mlruns`` of whichever process creates the experiment first (the flow's, a
    test's), which would scatter a project's artifacts over working directories."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=str(Path(root).resolve() / "mlruns" / name),
                                     tags={EXPERIMENT_KIND: MODEL_TRAINING})
            return
        except Exception:  # noqa: BLE001 - another stage process created it first
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)


# MLflow 3's UI opens an experiment in its GenAI view (traces, token usage) unless this tag says it
# is model training (the runs, charts and model registry view); mlflow/server/js: ExperimentKind.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"

# run.* keys whose value the stage resolves (auto -> bf16 or fp32, ...): logged once resolved, by
# services.training.run_training (the fast path as taken), never as the raw "auto".
RESOLVED_BY_STAGE = ("precision", "channels_last", "compile", "compile_mode")


def _without_raw_settings(section: dict) -> dict:
    """A training section without its ``settings`` as written (``8/255`` strings, every method's):
    the settings that ran are logged resolved, as ``method.*`` (services.training.run_training); of
    ``method_optim``, only the running method's overrides."""
    out = {k: v for k, v in section.items() if k != "settings"}
    if isinstance(out.get("method_optim"), dict):
        out["method_optim"] = {m: v for m, v in out["method_optim"].items() if m == section.get("method")}
    return out


def stage_params(raw: dict, sections: tuple[str, ...] = ()) -> dict:
    """The params a stage's MLflow run records: its own ``sections`` only (all when empty), and of
    ``distill`` only the settings and per-method optimiser of the method that runs (a run never lists
    another method's settings: the one that runs is logged resolved, as ``method.*``), without the
    run.* values the stage resolves itself."""
    out = {k: raw[k] for k in sections if k in raw} if sections else dict(raw)
    for section in ("teacher", "distill"):
        if isinstance(out.get(section), dict):
            out[section] = _without_raw_settings(out[section])
    if isinstance(out.get("run"), dict):
        out["run"] = {k: v for k, v in out["run"].items() if k not in RESOLVED_BY_STAGE}
    return out


def stage_config(params, sections: tuple[str, ...] = ()) -> dict:
    """The first part of a stage's resolved configuration: its own params sections, typed and
    resolved (:func:`stage_params` of the loaded :class:`services.params.Params`: defaults filled in,
    ``8/255`` a number, no other method's settings), as JSON values. What the stage resolves while it
    runs joins it through ``tracker.log_params``: a training stage adds the method's settings as run
    (``method.*``), the optimiser as resolved (``optimiser.*``, with the sentence saying how it was
    set), the fast path as taken (``run.precision``, ``run.compile``, ...), its resume inputs and data
    hashes (services/training.py :func:`~services.training.training_config`); the tracker's
    ``config`` is the whole, written as ``metrics/<name>_config.json`` and logged as the run's params
    (docs/pipeline.md#the-resolved-configuration-of-a-stage-run)."""
    from dataclasses import asdict

    return plain(stage_params(asdict(params), sections))


@contextlib.contextmanager
def _untracked(params, sections: tuple[str, ...]) -> Iterator[NullTracker]:
    """A NullTracker that still gathers the stage's configuration (tracking off, store away)."""
    tracker = NullTracker()
    if params is not None:
        tracker.log_params(stage_config(params, sections))
    _CURRENT.append(tracker)
    try:
        yield tracker
    finally:
        _CURRENT.pop()


@contextlib.contextmanager
def stage_run(stage: str, params=None, sections: tuple[str, ...] = (), enabled: bool = True,
              ) -> Iterator[NullTracker]:
    """An MLflow run for one stage execution (nested under ``ROBUSTKD_PARENT_RUN_ID`` when set).

    ``sections``: the params sections logged as the run's params (all of them when empty).
    A failing stage ends its run as FAILED; the exception propagates unchanged. An unreachable
    server or a locked store (after the bounded retries of :func:`with_retries`) leaves the stage
    untracked, with one line saying so.
    """
    if not enabled:   # a non-zero rank of a distributed run: records nothing, writes no config
        yield NullTracker()
        return
    if not tracking_enabled():
        with _untracked(params, sections) as tracker:
            yield tracker
        return
    dvc_stage = os.environ.get("DVC_STAGE", stage)
    tags = {"dvc_stage": dvc_stage, "stage": stage, "git_commit": git_commit()}
    if params is not None:
        tags["profile"] = params.profile
    parent = os.environ.get("ROBUSTKD_PARENT_RUN_ID") or None
    with keep_environment(*MLFLOW_ENV, *HTTP_BOUNDS):
        bound_mlflow_requests()
        try:
            mlflow = with_retries(setup_mlflow)
            run = with_retries(lambda: mlflow.start_run(run_name=dvc_stage, parent_run_id=parent, tags=tags))
        except Exception as exc:  # noqa: BLE001 - the store is unreachable or locked
            if not store_unavailable(exc):
                raise
            say_untracked("opening the MLflow run", exc)
            with _untracked(params, sections) as untracked:
                yield untracked
            return
        tracker = MlflowTracker(mlflow, run.info.run_id, run.info.experiment_id)
        status = "FAILED"
        _CURRENT.append(tracker)
        try:
            if params is not None:  # the typed, resolved values (defaults included, 8/255 as a number)
                tracker.log_params(stage_config(params, sections))
            yield tracker
            status = "FINISHED"
        finally:
            _CURRENT.pop()
            try:
                tracker._call("ending the run", lambda: mlflow.MlflowClient().set_terminated(tracker.run_id, status))
            except Exception as exc:  # noqa: BLE001 - never hides the stage's own outcome
                print(f"tracking: ending the run failed ({short_error(exc)})", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):  # off this process's active runs (a lost store: no matter)
                mlflow.end_run(status=status)
