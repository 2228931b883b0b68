"""The Prefect flow on a tiny profile, for real: prefect_test_harness, DVC in a temporary git
repository, MLflow in a SQLite store there; then the registry's aliases, the ONNX server on
127.0.0.1 and the predict CLI."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .stage_fixtures import project_copy

pytestmark = pytest.mark.slow

ALWAYS_RUN = ["fingerprint_data"]   # hashes the raw data every time; no MLflow run of its own
MAIN_STAGES = ["prepare_data", "train_teacher", "ingest_ddpm", "distill", "distill_reference", "evaluate",
               "export_onnx", "attention", "report"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """The flow run once on a fresh copy of the project; yields (repo, summary, client)."""
    from prefect.testing.utilities import prefect_test_harness

    repo = project_copy(tmp_path_factory.mktemp("flowrepo"))
    import mlflow

    from pipeline.flow import robustkd_pipeline

    with prefect_test_harness(server_startup_timeout=180):
        summary = robustkd_pipeline(project_dir=str(repo))
        rerun = robustkd_pipeline(project_dir=str(repo))
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    yield repo, summary, rerun, client


def test_flow_runs_every_stage_then_skips_them(flow_run):
    _, summary, rerun, _ = flow_run
    assert [r["stage"] for r in summary["stages"]] == ALWAYS_RUN + MAIN_STAGES
    assert all(r["ran"] for r in summary["stages"])
    # DVC skips what is up to date: the data's hash is the same, so prepare_data and all after it
    assert not any(r["ran"] for r in rerun["stages"] if r["stage"] not in ALWAYS_RUN)
    assert rerun["registered"]["reason"] == "this ONNX file is already registered (its aliases unchanged)"


def test_stage_runs_nest_under_the_flow_run(flow_run):
    repo, summary, _, client = flow_run
    parent_id = summary["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect_flow_run_id"]
    assert summary["mlflow_run_url"].endswith(f"/#/experiments/{parent.info.experiment_id}/runs/{parent_id}?workflowType=machine_learning")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["git_commit"].startswith(head)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_stage = {r.data.tags.get("dvc_stage", r.data.tags.get("stage")): r for r in children}
    assert set(MAIN_STAGES) | {"register"} == set(by_stage)
    for stage in MAIN_STAGES:
        assert by_stage[stage].data.tags["git_commit"].startswith(head)

    distill = by_stage["distill"]
    assert distill.data.params["distill.method"] == "darwin"
    for key in ("loss", "arkd", "iakd", "dbkd", "lr", "heldout_natural"):
        assert [m.step for m in client.get_metric_history(distill.info.run_id, key)] == [1, 2], key
    assert {"student_history.csv", "student_train.json", "student.pt"} <= \
        {a.path for a in client.list_artifacts(distill.info.run_id)}
    assert {"teacher/natural", "student/autoattack", "reference/pgd20"} <= set(by_stage["evaluate"].data.metrics)
    assert "student.onnx" in {a.path for a in client.list_artifacts(by_stage["export_onnx"].info.run_id)}
    report_files = {a.path for a in client.list_artifacts(by_stage["report"].info.run_id, "reports")}
    assert {"reports/report.html", "reports/training_curves.png"} <= report_files


def test_student_is_registered_as_champion(flow_run):
    repo, summary, _, client = flow_run
    assert summary["registered"]["version"] == "1" and summary["registered"]["alias"] == "champion"
    version = client.get_model_version_by_alias("robustkd-student", "champion")
    student = json.loads((repo / "metrics/evaluate/student.json").read_text())
    assert str(version.version) == "1"
    assert version.tags["method"] == "darwin" and version.tags["student"] == "resnet10_w8"
    assert version.tags["teacher"] == "resnet10_w8" and version.tags["dataset"] == "imagefolder"
    for key in ("natural", "pgd20", "cw", "autoattack"):
        assert float(version.tags[key]) == pytest.approx(student[key], abs=0.01)


def _variant(repo: Path, tag: str) -> Path:
    """The student's ONNX file with one more metadata entry: a different file, the same network."""
    import onnx

    proto = onnx.load(str(repo / "models/student.onnx"))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, "variant": tag})
    path = repo / f"models/student_{tag}.onnx"
    onnx.save(proto, str(path))
    return path


def test_champion_moves_only_to_a_version_at_least_as_robust(flow_run):
    from pipeline import registry

    repo, _, _, client = flow_run
    from services.tracking import setup_mlflow
    setup_mlflow(repo)
    champion, _ = registry.workspace_metadata(repo)   # the figures version 1 was tagged and ranked by
    first = client.get_model_version("robustkd-student", "1").tags
    assert first["comparison_group"] == registry.comparison_group(first) and first["threat_model"] == "Linf eps=8.0/255"
    assert first["autoattack_count"].count("/") == 1
    tags = {"method": "rslad", "student": "resnet10_w8", **{k: first[k] for k in registry.COMPARABILITY_TAGS}}

    weaker = {**champion, "autoattack": champion["autoattack"] - 5.0}
    version, decision = registry.register_onnx(_variant(repo, "weaker"), weaker, tags, "robustkd-student", 1.0)
    assert decision.alias == "challenger" and "AutoAttack" in decision.reason
    assert str(client.get_model_version_by_alias("robustkd-student", "champion").version) == "1"
    assert client.get_model_version("robustkd-student", version).tags["alias_reason"] == decision.reason

    less_accurate = {**champion, "autoattack": champion["autoattack"] + 1.0, "natural": champion["natural"] - 3.0}
    _, decision = registry.register_onnx(_variant(repo, "lessacc"), less_accurate, tags, "robustkd-student", 1.0)
    assert decision.alias == "challenger" and "natural" in decision.reason

    better = {**champion, "autoattack": champion["autoattack"] + 1.0, "natural": champion["natural"] - 0.5}
    version, decision = registry.register_onnx(_variant(repo, "better"), better, tags, "robustkd-student", 1.0)
    assert decision.alias == "champion"
    assert str(client.get_model_version_by_alias("robustkd-student", "champion").version) == version

    # another AutoAttack subset: not ranked against the champion, its own group's alias instead
    other = {**tags, "autoattack_images_sha256": "0" * 64}
    version, decision = registry.register_onnx(_variant(repo, "other"), better, other, "robustkd-student", 1.0)
    group = registry.comparison_group(other)
    assert decision.alias == f"champion-{group}" and "not comparable" in decision.reason
    assert "autoattack_images_sha256" in decision.reason
    assert str(client.get_model_version_by_alias("robustkd-student", "champion").version) != version

    table = registry.students_table("robustkd-student")
    rows = [line for line in table.splitlines() if line.split()[0].isdigit()]   # one per version
    assert len(rows) == 5 and "champion" in table and "challenger" in table and group in table
    assert max(map(len, table.splitlines())) <= 200, table   # a terminal's line (issue 28)


def _start_server(repo: Path, env: dict):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve_model", "--model",
                             "models:/robustkd-student@champion", "--port", "0"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()[-3000:]}")
    return proc, line.strip().rsplit(" ", 1)[-1]


def _post(url: str, body: bytes, ctype: str):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_onnx_server_answers_on_localhost_and_stops(flow_run):
    import numpy as np

    repo, _, _, _ = flow_run
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "PYTHONPATH": str(repo)}
    proc, base = _start_server(repo, env)
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=30) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "ok" and health["classes"] == [f"c{i}" for i in range(10)]
        images = np.random.default_rng(0).random((2, 3, 32, 32)).tolist()
        code, out = _post(f"{base}/predict", json.dumps({"instances": images}).encode(), "application/json")
        assert code == 200 and len(out["predictions"]) == 2
        assert out["predictions"][0]["class"] in health["classes"]
        png = next((repo / "raw/test/c3").glob("*.png")).read_bytes()
        code, out = _post(f"{base}/predict", png, "image/png")
        assert code == 200 and len(out["predictions"]) == 1
        code, out = _post(f"{base}/predict", json.dumps({"instances": [[1, 2]]}).encode(), "application/json")
        assert code == 422 and "wrong shape" in out["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


def test_predict_cli_names_the_class_of_image_files(flow_run):
    repo, _, _, _ = flow_run
    files = sorted(str(p) for p in (repo / "raw/test/c1").glob("*.png"))[:2]
    out = subprocess.run([sys.executable, "-m", "pipeline.predict", "--json", *files], cwd=repo,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in rows] == files and all(r["class"].startswith("c") for r in rows)
    bad = subprocess.run([sys.executable, "-m", "pipeline.predict", str(repo / "params.yaml")], cwd=repo,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert bad.returncode == 2 and "not a readable image" in bad.stderr
