"""`dvc repro` of a tiny profile in a temporary copy of the repository, for real."""

import json
import re

import pytest

from .stage_fixtures import project_copy, sh

pytestmark = pytest.mark.slow


ALWAYS_RUN = "fingerprint_data"   # hashes the raw data on every repro (always_changed)


def ran_stages(output: str) -> list[str]:
    """The stages DVC ran, less the always-run data fingerprint (asserted to run separately)."""
    names = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]
    return [n for n in names if n != ALWAYS_RUN]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return project_copy(tmp_path_factory.mktemp("dvcrepo"))


def test_repro_runs_every_stage_then_reruns_only_dependants(repo):
    first = sh("dvc repro", repo)
    assert f"Running stage '{ALWAYS_RUN}'" in first.stdout
    assert ran_stages(first.stdout) == ["prepare_data", "train_teacher", "ingest_ddpm", "distill",
                                        "distill_reference", "evaluate", "export_onnx", "attention", "report"]
    metrics = json.loads(sh("dvc metrics show --json", repo).stdout)
    workspace = next(iter(metrics.values()))  # DVC 3 keys the workspace as ""
    student = workspace["data"]["metrics/evaluate/student.json"]["data"]
    assert {"natural", "pgd20", "cw", "autoattack", "num_images", "per_class"} <= set(student)

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
    assert ran_stages(out.stdout) == ["compare/dvc.yaml:distill@darwin-0", "compare/dvc.yaml:distill@rslad-0",
                                      "compare/dvc.yaml:evaluate@darwin-0", "compare/dvc.yaml:evaluate@rslad-0",
                                      "compare/dvc.yaml:table"]
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
    assert (repo / "params.yaml").read_text().count("latency_repeats: 5") == 0
