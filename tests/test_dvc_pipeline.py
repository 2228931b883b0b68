"""`dvc repro` of a tiny profile in a temporary copy of the repository, for real."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .stage_fixtures import REPRO_STDOUT, ROOT, copy_project, sh

pytestmark = pytest.mark.slow


ALWAYS_RUN = "fingerprint_data"   # hashes the raw data on every repro (always_changed)


def ran_stages(output: str) -> list[str]:
    """The stages DVC ran, less the always-run data fingerprint (asserted to run separately)."""
    names = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]
    return [n for n in names if n != ALWAYS_RUN]


@pytest.fixture(scope="module")
def repo(tiny_repro, tmp_path_factory):
    """A copy of the session's tiny project after its one `dvc repro` (tests/conftest.py tiny_repro)."""
    return copy_project(tiny_repro, tmp_path_factory.mktemp("dvcrepo"))


def test_repro_runs_every_stage_then_reruns_only_dependants(tiny_repro, repo):
    first = (tiny_repro.parent / REPRO_STDOUT).read_text()   # the first `dvc repro` of the fresh project
    assert f"Running stage '{ALWAYS_RUN}'" in first
    ran = ran_stages(first)
    assert sorted(ran) == sorted(["prepare_data", "train_teacher", "ingest_ddpm", "distill", "distill_reference",
                                  "evaluate", "export_onnx", "attention", "report"])
    # DVC orders independent stages as it likes; every stage runs after what it depends on
    for before, after in [("prepare_data", "train_teacher"), ("train_teacher", "ingest_ddpm"),
                          ("ingest_ddpm", "distill"), ("train_teacher", "distill_reference"),
                          ("distill", "evaluate"), ("distill_reference", "evaluate"), ("distill", "export_onnx"),
                          ("evaluate", "report"), ("export_onnx", "report"), ("attention", "report")]:
        assert ran.index(before) < ran.index(after), (before, after, ran)
    metrics = json.loads(sh("dvc metrics show --json", repo).stdout)
    workspace = next(iter(metrics.values()))  # DVC 3 keys the workspace as ""
    student = workspace["data"]["metrics/evaluate/student.json"]["data"]
    assert {"natural", "pgd20", "cw", "autoattack", "num_images", "flagged"} <= set(student)
    # the headline numbers only: per-class accuracies and check details are in student_details.json
    assert not {"per_class_accuracy", "checks", "accuracy"} & set(student), sorted(student)

    assert ran_stages(sh("dvc repro", repo).stdout) == []  # everything up to date
    # bytecode written by the run changes no dependency; only the always-run data hash is listed
    status = sh("dvc status dvc.yaml", repo).stdout
    assert status.split() == [f"{ALWAYS_RUN}:", "always", "changed"], status

    params_path = repo / "params.yaml"
    text = params_path.read_text().replace("latency_repeats: 2", "latency_repeats: 3")
    params_path.write_text(text)
    assert ran_stages(sh("dvc repro", repo).stdout) == ["export_onnx", "report"]



def test_comparison_pipeline_writes_the_table(repo):
    sh("dvc repro", repo)
    out = sh("dvc repro compare/dvc.yaml", repo)
    ran = ran_stages(out.stdout)
    assert sorted(ran) == ["compare/dvc.yaml:distill@darwin-0", "compare/dvc.yaml:distill@rslad-0",
                           "compare/dvc.yaml:evaluate@darwin-0", "compare/dvc.yaml:evaluate@rslad-0",
                           "compare/dvc.yaml:table"]
    assert ran[-1] == "compare/dvc.yaml:table"   # after every evaluation; DVC orders the others freely
    for m in ("darwin", "rslad"):
        assert ran.index(f"compare/dvc.yaml:distill@{m}-0") < ran.index(f"compare/dvc.yaml:evaluate@{m}-0")
    table = (repo / "reports/comparison.md").read_text()
    assert "| darwin |" in table and "| rslad |" in table and "| Teacher resnet10_w8 |" in table


def test_metrics_diff_after_a_commit_and_a_temporary_experiment(repo):
    """Metrics are committed files of numbers: `dvc metrics diff` compares a change with the commit;
    `dvc exp run --temp` runs in DVC's temporary workspace (data.root resolved there too)."""
    sh("dvc repro", repo)
    sh("git add -A && git -c user.email=t@t -c user.name=t commit -qm run", repo)
    params_path = repo / "params.yaml"
    params_path.write_text(re.sub(r"latency_repeats: \d+", "latency_repeats: 7", params_path.read_text()))
    sh("dvc repro -s export_onnx", repo)
    diff = json.loads(sh("dvc metrics diff --json", repo).stdout)  # the latencies moved
    assert {"old", "new", "diff"} <= set(diff["metrics/export.json"]["latency.batch1.torch_ms"])
    sh("git checkout -q params.yaml && dvc checkout -q", repo, check=False)
    out = sh("dvc exp run --temp -S export.latency_repeats=5", repo)
    assert "Ran experiment" in out.stdout + out.stderr or "Reproducing experiment" in out.stdout, out.stdout
    # DVC's temporary workspace restores the cached models and checkpoints: nothing is trained again
    assert set(ran_stages(out.stdout)) <= {"prepare_data", "export_onnx", "report"}, out.stdout
    assert (repo / "params.yaml").read_text().count("latency_repeats: 5") == 0


ARTIFACTS = Path(os.environ.get("ROBUSTKD_TEST_ARTIFACTS") or ROOT / "test-artifacts")


def experiments(table) -> dict[str, dict]:
    """name -> data of every named experiment in `dvc exp show --json` (nested lists and dicts)."""
    found = {}
    if isinstance(table, dict):
        if table.get("name") and isinstance(table.get("data"), dict) and "metrics" in table["data"]:
            found[table["name"]] = table["data"]
        for value in table.values():
            found.update(experiments(value))
    elif isinstance(table, list):
        for value in table:
            found.update(experiments(value))
    return found


def test_experiments_set_params_queue_and_compare(repo):
    """`dvc exp run -S` in the workspace and a queued `dvc exp run --queue -S` (run by the queue's
    worker in its own workspace under .dvc/tmp/exps) on a cheap setting (the ONNX latency repeats:
    export_onnx and report re-run): both listed by `dvc exp show` with the evaluation metrics;
    `dvc metrics diff` and `dvc params diff` compare them."""
    sh("git checkout -q params.yaml && dvc checkout -q", repo, check=False)
    sh("dvc repro", repo)
    sh("git config user.email t@t && git config user.name t && git add -A && git commit -qm baseline --allow-empty",
       repo)
    out = sh("dvc exp run -n rep8 -S export.latency_repeats=8", repo)
    assert ran_stages(out.stdout) == ["export_onnx", "report"], out.stdout
    sh("dvc exp run --queue -n rep9 -S export.latency_repeats=9", repo)
    queued = sh("dvc exp run --run-all", repo)   # = `dvc queue start`, waiting for the queue to finish
    assert "rep9" in queued.stdout + queued.stderr, queued.stdout[-3000:] + queued.stderr[-3000:]

    exps = experiments(json.loads(sh("dvc exp show --json", repo).stdout))
    assert {"rep8", "rep9"} <= set(exps), sorted(exps)
    for name, repeats in (("rep8", 8), ("rep9", 9)):
        student = exps[name]["metrics"]["metrics/evaluate/student.json"]["data"]
        assert {"natural", "pgd20", "cw", "autoattack"} <= set(student), (name, sorted(student))
        assert "latency" in exps[name]["metrics"]["metrics/export.json"]["data"]
        assert exps[name]["params"]["params.yaml"]["data"]["export"]["latency_repeats"] == repeats

    params_diff = json.loads(sh("dvc params diff rep8 rep9 --json", repo).stdout)
    assert params_diff["params.yaml"]["export.latency_repeats"] | {"diff": None} == {"old": 8, "new": 9, "diff": None}
    metrics_diff = json.loads(sh("dvc metrics diff rep8 rep9 --all --json", repo).stdout)
    assert {"old", "new"} <= set(metrics_diff["metrics/evaluate/student.json"]["pgd20"])
    assert {"old", "new"} <= set(metrics_diff["metrics/export.json"]["latency.batch1.onnxruntime_ms"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dvc_experiments.txt").write_text("\n\n".join(
        f"$ {cmd}\n{sh(cmd, repo).stdout}" for cmd in (
            "dvc exp show --no-pager --md --drop '.*' --keep 'Experiment|metrics/evaluate/student.json:"
            "(natural|pgd20|autoattack)$|latency.batch1.onnxruntime_ms|export.latency_repeats'",
            "dvc params diff rep8 rep9", "dvc metrics diff rep8 rep9 --targets metrics/export.json")))


def test_plots_render_offline(repo):
    """`python -m pipeline.plots diff` (dvc plots diff with the offline template) between the two
    experiments: every dvc.yaml plot, no script from the network; in headless Chromium the charts draw."""
    page = sh(f"{sys.executable} -m pipeline.plots diff rep8 rep9 -o plots_out", repo,
              env={"PYTHONPATH": str(repo)})
    html = (repo / "plots_out" / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "a script is loaded from a file or URL"
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", html)
    for title in ("Teacher training loss", "Student training loss", "Held-out PGD accuracy (%)",
                  "Accuracy per attack (%)"):
        assert title in html, title
    assert "rep8" in html and "rep9" in html and "offline plots:" in page.stdout

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if not exe:
        pytest.skip("chromium is not installed: the page's HTML was checked, not its drawing "
                    "(tests/test_report_browser.py installs chromium with apt-get as root)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-first-run", "--disable-background-networking", "--virtual-time-budget=10000",
            "--window-size=1100,1900"]
    url = (repo / "plots_out" / "index.html").as_uri()
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    # vega-embed draws each chart into a <canvas class="marks"> (or an <svg>): one per dvc.yaml plot
    assert dom.count('class="marks"') >= 4, dom[-2000:]
    subprocess.run([*args, f"--screenshot={ARTIFACTS / 'dvc_plots.png'}", url], capture_output=True, timeout=180)
