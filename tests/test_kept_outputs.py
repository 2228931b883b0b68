"""A failing stage keeps the previous run's outputs (issue 29, item 4).

`dvc repro` deletes a stage's outputs before it runs the command, unless they are `persist: true`
(https://dvc.org/doc/command-reference/repro); the uncached ones (metrics, info files) were then
lost for good when the stage failed. Every output of the three pipelines persists, each stage reads
its inputs before it writes anything, and every file is replaced atomically. Shown here on one tiny
`dvc repro` in a temporary copy of the project, with the faults of the issue made to happen: a
truncated teacher under distill, a count above the prepared one, a damaged MLflow store. Each ends
with one line, every file of the good run is still there byte for byte, and after the fault is
undone `dvc status` is clean again (docs/troubleshooting.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from services.best_last import remove_unlisted_best

from .stage_fixtures import ROOT, copy_project, make_image_folder, sh, tiny_params, write_params

ALWAYS_RUN = "fingerprint_data"
PIPELINES = ("dvc.yaml", "compare/dvc.yaml", "ablation/dvc.yaml")


def outputs_of(stage: dict) -> list[tuple[str, dict]]:
    found = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind) or []:
            path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            found.append((path, opts or {}))
    return found


def test_every_output_of_every_pipeline_persists():
    """Without `persist: true`, DVC deletes the output before the stage runs, and a stage that
    fails (on bad input, before it wrote anything) leaves nothing of the previous run."""
    missing = []
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((ROOT / pipeline).read_text())["stages"].items():
            missing += [f"{pipeline}:{name}: {path}" for path, opts in outputs_of(stage.get("do", stage))
                        if opts.get("persist") is not True]
    assert not missing, missing


def test_best_results_no_longer_listed_are_removed_and_the_listed_ones_kept(tmp_path, capsys):
    """Persistent outputs must not pass an earlier run's files off as this run's: the results of a
    best checkpoint that evaluate.best_checkpoints no longer names are removed after the stage."""
    names = ["teacher", "teacher_best", "student", "student_best", "reference_best"]
    for name in names:
        for suffix in (".json", "_info.json", "_per_image.npz"):
            (tmp_path / f"{name}{suffix}").write_text(name)
    removed = remove_unlisted_best(tmp_path, ["student"])
    assert sorted(p.name for p in removed) == sorted(f"{n}{s}" for n in ("teacher_best", "reference_best")
                                                     for s in (".json", "_info.json", "_per_image.npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}{s}" for n in ("teacher", "student", "student_best") for s in (".json", "_info.json", "_per_image.npz"))
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 6 and all("evaluate.best_checkpoints (['student']) no longer lists" in s for s in said)


# ------------------------------------------------------------------ the stages' own part, in process
@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """Prepared tiny data, a teacher, a student and a reference checkpoint, tracking off."""
    import torch

    from robustkd.checkpoints import save_checkpoint
    from robustkd.models import create_model
    from stages import prepare_data

    make_image_folder(tmp_path / "raw", train_per_class=3, test_per_class=1)
    p = tiny_params(str(tmp_path / "raw"))
    p["data"].update(train_per_class=2, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)
    write_params(tmp_path / "params.yaml", p)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "off")
    prepare_data.run([])
    torch.manual_seed(0)
    for name in ("teacher", "student", "reference", "student_best"):
        save_checkpoint(create_model("resnet10_w8"), tmp_path / "models" / f"{name}.pt", method="natural_kd")
    return tmp_path


def files_under(root: Path, *dirs: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for d in dirs for p in sorted((root / d).rglob("*"))
            if p.is_file()}


def test_evaluate_reads_every_checkpoint_before_it_replaces_a_result(stage_dir, capsys):
    """A truncated student.pt: evaluate refuses it before the teacher's results (evaluated first)
    are replaced; every previous result stays as it was."""
    from stages import evaluate

    out = stage_dir / "metrics/evaluate"
    out.mkdir(parents=True)
    for name in ("teacher", "student", "reference", "student_best"):
        for suffix in (".json", "_info.json", "_per_image.npz"):
            (out / f"{name}{suffix}").write_text(f"the previous run's {name}{suffix}")
    truncate(stage_dir / "models/student.pt")
    before = files_under(stage_dir, "metrics/evaluate")
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        evaluate.run([])
    assert err.value.code == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith("error: checkpoint models/student.pt cannot be read: truncated or corrupt"), said
    assert files_under(stage_dir, "metrics/evaluate") == before


def test_export_replaces_the_onnx_file_only_after_its_checks(stage_dir, monkeypatch, capsys):
    """A new export that fails its parity check leaves the previous student.onnx and export
    figures, and no temporary file."""
    from robustkd.errors import InputError
    from stages import export_onnx

    export_onnx.run([])
    before = files_under(stage_dir, "models", "metrics")
    assert "models/student.onnx" in before and "metrics/export.json" in before

    def parity_fails(*args, **kwargs):
        raise InputError("onnxruntime parity: max |logit difference| 1 exceeds export.parity_atol 0.0001")

    monkeypatch.setattr(export_onnx, "parity", parity_fails)
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        export_onnx.run([])
    assert err.value.code == 2 and capsys.readouterr().err.strip().startswith("error: onnxruntime parity")
    assert files_under(stage_dir, "models", "metrics") == before    # no .student.onnx.*.tmp either


# ------------------------------------------------------------------ the faults, under `dvc repro`
# What the good run produced: every file whose loss the issue found (the student's metrics,
# metrics/evaluate/*, metrics/export*.json, data/prepared), every other output, and the lock.
KEPT_DIRS = ("data", "metrics", "models", "reports")


def snapshot(repo: Path) -> dict[str, bytes]:
    files = {"dvc.lock": (repo / "dvc.lock").read_bytes()}
    for d in KEPT_DIRS:
        files.update({str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / d).rglob("*")) if p.is_file()})
    return files


def status_clean(repo: Path) -> bool:
    """`dvc status`: nothing but the always-run data fingerprint is out of date."""
    return sh("dvc status dvc.yaml", repo).stdout.split() == [f"{ALWAYS_RUN}:", "always", "changed"]


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def stage_error(proc) -> str:
    """The one line the failing stage printed (DVC adds its own 'ERROR: failed to reproduce ...')."""
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    said = error_lines(proc)
    assert len(said) == 1, proc.stderr[-4000:]
    return said[0]


@pytest.fixture(scope="module")
def good_run(tiny_repro, tmp_path_factory):
    """One tiny pipeline run, committed (a copy of the session's, tests/conftest.py tiny_repro);
    every fault below starts from it and is undone after."""
    repo = copy_project(tiny_repro, tmp_path_factory.mktemp("kept"))
    assert status_clean(repo)
    return repo, snapshot(repo)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_truncated_teacher_fails_distill_in_one_line_and_the_students_files_stay(good_run):
    """The flow's `dvc repro --single-item distill` on a truncated models/teacher.pt: distill
    refuses the file before it writes anything; the student's model, metrics, history and the
    evaluation, export and report of the good run are untouched. `dvc checkout` restores the
    teacher and nothing is left to run."""
    repo, before = good_run
    teacher = repo / "models/teacher.pt"
    truncate(teacher)
    proc = sh("dvc repro --single-item distill", repo, check=False)
    line = stage_error(proc)
    assert line.startswith("error: checkpoint models/teacher.pt cannot be read: truncated or corrupt"), line
    after = snapshot(repo)
    assert {k for k in before if after.get(k) != before[k]} == {"models/teacher.pt"}

    sh("dvc checkout --force models/teacher.pt", repo)   # --force: the truncated file is in no cache
    assert "Running stage" not in sh("dvc repro --single-item distill", repo).stdout
    assert snapshot(repo) == before and status_clean(repo)


@pytest.mark.slow
def test_a_count_above_the_prepared_one_fails_before_anything_is_replaced(good_run):
    """evaluate.per_class above data.test_per_class: `dvc repro` stops at its first stage, which
    checks the params; the flow's `dvc repro --single-item evaluate` stops in evaluate, whose
    outputs DVC no longer deletes: metrics/evaluate/* stay. The params restored, nothing runs."""
    repo, before = good_run
    params_path = repo / "params.yaml"
    good = params_path.read_text()
    bad = yaml.safe_load(good)
    bad["evaluate"]["per_class"] = 100
    write_params(params_path, bad)
    expected = ("error: params.yaml: evaluate.per_class: expected at most data.test_per_class (3) test images "
                "per class, found 100")
    for cmd in ("dvc repro", "dvc repro --single-item evaluate"):
        proc = sh(cmd, repo, check=False)
        assert stage_error(proc).startswith(expected), (cmd, proc.stderr[-2000:])
        assert snapshot(repo) == before, cmd

    params_path.write_text(good)
    ran = [line for line in sh("dvc repro", repo).stdout.splitlines() if line.startswith("Running stage")]
    assert ran == [f"Running stage '{ALWAYS_RUN}':"], ran
    assert snapshot(repo) == before and status_clean(repo)


def damage(db: Path) -> None:
    """Overwrite the pages after the first (the schema) with noise: SQLite then says 'database disk
    image is malformed' (https://www.sqlite.org/fileformat2.html: pages of 4096 bytes here)."""
    data = bytearray(db.read_bytes())
    for i in range(4096, len(data)):
        data[i] = (i * 131 + 7) % 256
    db.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_mlflow_store_leaves_the_stage_untracked_in_one_line_and_loses_nothing(good_run):
    """A damaged mlflow.db while export_onnx re-runs (`dvc repro --single-item --force`): the
    stage finishes untracked, saying so in one line, its new files complete; every other file of
    the good run is untouched. The store restored, one `dvc repro` (the report, whose input
    metrics/export.json changed) leaves `dvc status` clean."""
    repo, before = good_run
    db = repo / "mlflow.db"
    backup = db.read_bytes()
    damage(db)
    proc = sh("dvc repro --single-item --force export_onnx", repo, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("tracking:")]
    assert len(said) == 1 and "the store is damaged" in said[0] and said[0].endswith("the stage goes on untracked"), \
        proc.stderr[-4000:]
    after = snapshot(repo)
    rewritten = {k for k in before if after.get(k) != before[k]}
    assert rewritten <= {"dvc.lock", "metrics/export.json", "models/student.onnx"}, rewritten
    assert set(after) == set(before)
    assert json.loads((repo / "metrics/export.json").read_text())["max_abs_logit_diff"] >= 0   # complete

    db.write_bytes(backup)   # or moved aside, as the line says: the next stage starts a new store
    ran = [line for line in sh("dvc repro", repo).stdout.splitlines() if line.startswith("Running stage")]
    assert ran == [f"Running stage '{ALWAYS_RUN}':", "Running stage 'report':"], ran
    assert status_clean(repo)
