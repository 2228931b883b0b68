"""What the Prefect UI shows of the pipeline's deployment: each parameter with its description
(from the flow's docstring), the seed override, and the flow run's link to its MLflow parent run."""

import shutil

import pytest
import yaml

from .stage_fixtures import ROOT


def test_every_flow_parameter_has_a_description():
    from prefect.utilities.callables import parameter_schema

    from pipeline.flow import robustkd_pipeline

    props = parameter_schema(robustkd_pipeline.fn).model_dump()["properties"]
    assert set(props) == {"preset", "methods", "seed", "register_model", "project_dir", "wait_lock_s"}
    for name, prop in props.items():
        assert len(prop.get("description", "")) > 20, (name, prop)
    assert "params/" in props["preset"]["description"] and "run.seed" in props["seed"]["description"]
    assert props["seed"]["anyOf"][0]["type"] == "integer"


def test_seed_parameter_sets_run_seed_for_the_run_only(tmp_path):
    from pipeline.flow import run_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    text = run_params(tmp_path, None, None, seed=123)
    assert yaml.safe_load(text)["run"]["seed"] == 123
    assert (tmp_path / "params.yaml").read_bytes() == before
    assert run_params(tmp_path, None, None) is None


def test_mlflow_run_url(monkeypatch):
    from pipeline.flow import mlflow_run_url

    assert mlflow_run_url("abc", "3", "http://10.0.0.5:5000/") == "http://10.0.0.5:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.delenv("ROBUSTKD_MLFLOW_UI", raising=False)
    assert mlflow_run_url("abc", "3", "sqlite:///x/mlflow.db") == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.setenv("ROBUSTKD_MLFLOW_UI", "http://mlflow.lab:8080")
    assert mlflow_run_url("abc", "3", "sqlite:///x/mlflow.db") == "http://mlflow.lab:8080/#/experiments/3/runs/abc?workflowType=machine_learning"


@pytest.mark.slow
def test_flow_run_artifacts_link_the_mlflow_parent_run():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.flow import link_mlflow_run

    summary = {"parent_run_id": "0123abcd", "mlflow_run_url": "http://127.0.0.1:5000/#/experiments/1/runs/0123abcd",
               "stages": [{"stage": "prepare_data", "ran": True}, {"stage": "report", "ran": False}],
               "registered": {"version": "2", "alias": "champion", "reason": "first registered student"}}

    @flow
    def linked():
        link_mlflow_run(summary)

    with prefect_test_harness(server_startup_timeout=180):
        linked()
        with get_client(sync_client=True) as client:
            found = {a.key: a for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mlflow-parent-run", "pipeline-summary"])))}
    assert set(found) == {"mlflow-parent-run", "pipeline-summary"}
    assert summary["mlflow_run_url"] in found["mlflow-parent-run"].data
    assert "| report | up to date |" in found["pipeline-summary"].data and "champion" in found["pipeline-summary"].data
