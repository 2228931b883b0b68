"""`dvc repro` of a tiny profile in a temporary copy of the repository, for real."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .stage_fixtures import ROOT, make_image_folder, tiny_params, write_params

pytestmark = pytest.mark.slow


def sh(cmd, cwd, check=True):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=env)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dvcrepo")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files += [f for f in subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                                        capture_output=True, text=True).stdout.split()]
    for f in files:
        if f.startswith(".dvc/") or not (ROOT / f).is_file():
            continue
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tmp / f)
    make_image_folder(tmp / "raw")
    write_params(tmp / "params.yaml", tiny_params("raw"))
    sh("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm init", tmp)
    sh("dvc init -q && dvc config core.analytics false && dvc config core.check_update false", tmp)
    return tmp


def test_repro_runs_every_stage_then_reruns_only_dependants(repo):
    first = sh("dvc repro", repo)
    assert ran_stages(first.stdout) == ["prepare_data", "train_teacher", "ingest_ddpm", "distill",
                                        "distill_reference", "evaluate", "export_onnx", "report"]
    metrics = json.loads(sh("dvc metrics show --json", repo).stdout)
    workspace = next(iter(metrics.values()))  # DVC 3 keys the workspace as ""
    student = workspace["data"]["metrics/evaluate/student.json"]["data"]
    assert {"natural", "pgd20", "cw", "autoattack", "num_images", "per_class"} <= set(student)

    assert ran_stages(sh("dvc repro", repo).stdout) == []  # everything up to date

    params_path = repo / "params.yaml"
    text = params_path.read_text().replace("latency_repeats: 2", "latency_repeats: 3")
    params_path.write_text(text)
    assert ran_stages(sh("dvc repro", repo).stdout) == ["export_onnx", "report"]



def test_comparison_pipeline_writes_the_table(repo):
    sh("dvc repro", repo)
    out = sh("dvc repro compare/dvc.yaml", repo)
    assert ran_stages(out.stdout) == ["compare/dvc.yaml:distill@darwin", "compare/dvc.yaml:distill@rslad",
                                      "compare/dvc.yaml:evaluate@darwin", "compare/dvc.yaml:evaluate@rslad",
                                      "compare/dvc.yaml:table"]
    table = (repo / "reports/comparison.md").read_text()
    assert "| darwin |" in table and "| rslad |" in table and "| Teacher resnet10_w8 |" in table
