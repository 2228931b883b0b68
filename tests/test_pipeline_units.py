"""Fast tests of the orchestration layer's decisions: champion/challenger, retries, params
rewriting, the stage list; and hadolint on the Dockerfile."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.flow import (StageFailed, compare_stages, is_transient_output, main_stages, params_for_this_run,
                           run_params)
from pipeline.registry import CHALLENGER, CHAMPION, decide_alias
from services.tracking import flatten, numeric_metrics

from .stage_fixtures import ROOT, tiny_params, write_params


def test_first_version_is_champion():
    assert decide_alias({"natural": 50, "autoattack": 20}, None, 1.0).alias == CHAMPION


@pytest.mark.parametrize("new, alias, word", [
    ({"natural": 50.0, "autoattack": 20.0}, CHAMPION, "AutoAttack"),     # equal AA is enough
    ({"natural": 49.0, "autoattack": 21.0}, CHAMPION, "within"),         # natural at the tolerance
    ({"natural": 48.9, "autoattack": 25.0}, CHALLENGER, "natural"),      # natural beyond it
    ({"natural": 60.0, "autoattack": 19.9}, CHALLENGER, "AutoAttack"),   # less robust
    ({"natural": 60.0, "autoattack": None}, CHALLENGER, "no AutoAttack"),
])
def test_champion_rule(new, alias, word):
    decision = decide_alias(new, {"natural": 50.0, "autoattack": 20.0}, 1.0)
    assert decision.alias == alias and word in decision.reason


def test_only_transient_failures_are_retried():
    killed = "ERROR: failed to reproduce 'distill': failed to run: python -m stages.distill, exited with -9"
    locked = "ERROR: Unable to acquire lock. Most likely another DVC process is running"
    bad_input = "error: params.yaml: distill.optim: unknown key 'lrr'\nERROR: ... exited with 2"
    assert is_transient_output(killed) and is_transient_output(locked)
    assert not is_transient_output(bad_input)
    assert "not retried" in str(StageFailed("distill", 255, False, bad_input))


def test_methods_and_presets_never_change_params_yaml(tmp_path):
    """--methods / --preset: validated params stand in for params.yaml during the run only; the
    file's bytes come back, also when the run fails."""
    import yaml

    (tmp_path / "params").mkdir()
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "params/cpu.yaml").write_text((ROOT / "params/cpu.yaml").read_text())
    before = (tmp_path / "params.yaml").read_bytes()
    text = run_params(tmp_path, None, ["darwin", "ard"])
    assert yaml.safe_load(text)["compare"]["methods"] == ["darwin", "ard"]
    with pytest.raises(RuntimeError):
        with params_for_this_run(tmp_path, text):
            assert yaml.safe_load((tmp_path / "params.yaml").read_text())["compare"]["methods"] == ["darwin", "ard"]
            raise RuntimeError("a stage failed")
    assert (tmp_path / "params.yaml").read_bytes() == before
    assert run_params(tmp_path, "cpu", None) and run_params(tmp_path, None, None) is None
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_bad_methods_or_presets_are_refused_before_anything_is_written(tmp_path):
    from robustkd.errors import InputError

    write_params(tmp_path / "params.yaml", tiny_params("raw"))
    (tmp_path / "params").mkdir()
    before = (tmp_path / "params.yaml").read_bytes()
    with pytest.raises(ValueError, match="preset 'nope'"):
        run_params(tmp_path, "nope", None)
    with pytest.raises(InputError, match="compare.methods"):
        run_params(tmp_path, None, [3])
    assert (tmp_path / "params.yaml").read_bytes() == before
    write_params(tmp_path / "params.yaml", {k: v for k, v in tiny_params("raw").items() if k != "compare"})
    with pytest.raises(ValueError, match="compare"):
        run_params(tmp_path, None, ["darwin"])


def test_stage_lists():
    assert main_stages(ROOT)[:3] == ["fingerprint_data", "prepare_data", "train_teacher"]
    assert main_stages(ROOT)[-1] == "report"
    assert compare_stages(["a", "b"]) == ["compare/dvc.yaml:distill@a-0", "compare/dvc.yaml:distill@b-0",
                                          "compare/dvc.yaml:evaluate@a-0", "compare/dvc.yaml:evaluate@b-0",
                                          "compare/dvc.yaml:table"]
    assert compare_stages(["a"], [0, 3])[:2] == ["compare/dvc.yaml:distill@a-0", "compare/dvc.yaml:distill@a-3"]


def test_tracking_flattens_params_and_keeps_finite_numbers():
    assert flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": "1", "a.c": "[1, 2]"}
    got = numeric_metrics({"x": 1, "m": "darwin", "ok": True, "nan": float("nan"), "lat": {"b1": {"ms": 2.0}}})
    assert got == {"x": 1.0, "lat/b1/ms": 2.0}


def test_hadolint_passes_on_the_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_the_readme_test_command():
    assert (ROOT / ".ci/run").read_text().strip().splitlines()[-1].strip() == "make test"
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make setup" in (ROOT / "Dockerfile").read_text()


def test_launch_builds_the_torchrun_command():
    from stages.launch import params_path, torchrun_command
    from services.params import RunParams

    single = torchrun_command("distill", ["--method", "rslad"], RunParams(nproc_per_node=4))
    assert single[1:] == ["--nproc_per_node=4", "--standalone", "-m", "stages.distill", "--method", "rslad"]
    multi = torchrun_command("evaluate", [], RunParams(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29400"))
    assert "--nnodes=2" in multi and "--rdzv-endpoint=node0:29400" in multi and "--standalone" not in multi
    assert params_path(["--params", "p.yaml"]) == "p.yaml" and params_path([]) == "params.yaml"


def test_several_nodes_need_a_rendezvous_endpoint():
    from robustkd.errors import InputError
    from services.params import RunParams

    with pytest.raises(InputError, match="rdzv_endpoint"):
        RunParams(nnodes=2)


def test_tracking_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    """MLflow exports MLFLOW_TRACKING_URI/EXPERIMENT_ID; a second project in the same process (or a
    child process) must not inherit the first one's store."""
    import os

    from services.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    with stage_run("unit") as tracker:
        tracker.log_metrics({"x": 1.0}, step=1)
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == before
    assert (tmp_path / "mlflow.db").exists()


def test_official_schedules_rescale_to_the_profile_and_take_overrides(tmp_path):
    import yaml

    from services.params import load_params, resolve_optim

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"].update(schedule="official", official_epochs=6, method_optim={"rslad": {"lr": 0.05}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "p.yaml")
    ard, how = resolve_optim(params, "ard", 10)
    assert (ard.epochs, ard.milestones, ard.weight_decay, ard.schedule) == (6, [3.0], 2e-4, "piecewise")
    assert "200 epochs rescaled to 6" in how
    rslad, how = resolve_optim(params, "rslad", 100)
    assert rslad.lr == 0.05 and rslad.milestones == pytest.approx([4.3, 5.2, 5.7]) and "rslad" in how
    assert resolve_optim(params, "adaad", 10)[0].weight_decay == 5e-4
    for chosen in ("crdnd", "gacd", "darwin"):   # no official recipe: recorded as the method's choice
        how = resolve_optim(params, chosen, 10)[1]
        assert how.startswith("the method's recipe (") and "[choice]" in how, how
    shared, how = resolve_optim(params, "ard", 10, schedule="shared")
    assert shared.schedule == raw["distill"]["optim"]["schedule"] and how.startswith("shared")


def test_git_commit_is_dirty_only_for_changes_other_than_the_pipelines_records(tmp_path):
    from services.tracking import git_commit

    def git(*a):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "metrics").mkdir()
    for f in ("dvc.lock", "metrics/m.json", "code.py"):
        (tmp_path / f).write_text("1")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    (tmp_path / "dvc.lock").write_text("2")
    (tmp_path / "metrics/m.json").write_text("2")
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("2")
    assert git_commit(tmp_path).endswith("-dirty")


def test_a_moved_workspace_still_opens_its_runs_and_artifacts(tmp_path, monkeypatch):
    """MLflow stores absolute artifact paths; the project's store follows a moved folder."""
    import shutil

    from services.tracking import keep_environment, setup_mlflow, MLFLOW_ENV

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.chdir(old)
    (old / "a.txt").write_text("hello")
    with keep_environment(*MLFLOW_ENV):
        mlflow = setup_mlflow(old)
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(old / "a.txt"))
    shutil.move(str(old), str(new))
    monkeypatch.chdir(new)
    with keep_environment(*MLFLOW_ENV):
        mlflow = setup_mlflow(new)
        got = mlflow.get_run(run.info.run_id)
        assert str(new) in got.info.artifact_uri and str(old) not in got.info.artifact_uri
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="a.txt",
                                                   dst_path=str(tmp_path / "dl"))
    assert Path(path).read_text() == "hello"


def test_significant_promotion_needs_a_small_mcnemar_p():
    better = {"natural": 50.0, "autoattack": 25.0}
    champ = {"natural": 50.0, "autoattack": 20.0}
    assert decide_alias(better, champ, 1.0, "significant", p_value=0.2).alias == CHALLENGER
    assert "not a significant" in decide_alias(better, champ, 1.0, "significant", p_value=0.2).reason
    assert decide_alias(better, champ, 1.0, "significant", p_value=0.01).alias == CHAMPION
    assert decide_alias(better, champ, 1.0, "significant", p_value=None).alias == CHALLENGER
    assert decide_alias(better, champ, 1.0, "point_estimate", p_value=0.2).alias == CHAMPION
    with pytest.raises(ValueError, match="registry.promotion"):
        decide_alias(better, champ, 1.0, "vibes")


def test_comparison_groups_and_paired_p_values():
    import numpy as np

    from pipeline.registry import comparison_group, incomparable, paired_p_value

    a = {"dataset": "cifar10", "autoattack_images_sha256": "ab", "threat_model": "Linf eps=8/255", "method": "x"}
    assert comparison_group(a) == comparison_group({**a, "method": "y"})
    assert comparison_group(a) != comparison_group({**a, "threat_model": "Linf eps=4/255"})
    assert incomparable(a, {**a, "method": "y"}) == ""
    assert "dataset" in incomparable(a, {**a, "dataset": "cifar100"})
    idx = np.arange(8)
    new = (idx, np.array([1, 1, 1, 1, 1, 1, 0, 0], bool))
    old = (idx, np.array([0, 0, 0, 0, 0, 0, 0, 0], bool))
    p, how = paired_p_value(new, old)
    assert p == pytest.approx(2 / 2 ** 6) and "6" in how            # 6 discordant pairs, all one way
    assert paired_p_value(new, (idx + 1, old[1]))[0] is None
    assert paired_p_value(None, old) == (None, "per-image AutoAttack outcomes missing")


def test_the_prefect_port_is_a_make_variable_that_the_ui_follows():
    """`make prefect-server PREFECT_PORT=N`: the server listens on N and its UI calls the API on N
    (PREFECT_UI_API_URL); `make schedule` deploys to the same port."""
    import subprocess
    out = subprocess.run(["make", "-n", "prefect-server", "schedule", "PREFECT_PORT=4311", "VENV=.venv"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--port 4311" in out and "PREFECT_UI_API_URL=http://127.0.0.1:4311/api" in out, out
    assert "PREFECT_API_URL=http://127.0.0.1:4311/api" in out and "4200" not in out, out


def test_the_deployment_form_offers_the_presets_and_methods_as_choices():
    """Prefect's parameter schema of the flow: preset is one of params/'s presets, methods a list of
    the registry's distillation methods, each optional with its default and description."""
    from prefect.utilities.callables import parameter_schema

    from pipeline.flow import robustkd_pipeline
    from services.params import DISTILL_METHODS
    from services.presets import preset_names
    props = parameter_schema(robustkd_pipeline.fn).model_dump()["properties"]
    assert props["preset"]["anyOf"][0]["enum"] == preset_names(ROOT) and props["preset"]["default"] is None
    assert props["methods"]["anyOf"][0]["items"]["enum"] == list(DISTILL_METHODS)
    assert props["seed"]["anyOf"][0]["type"] == "integer" and props["register_model"]["default"] is True
    assert all(props[k].get("description") for k in ("preset", "methods", "seed", "register_model"))


def test_stage_params_keep_the_stage_own_sections_and_the_method_that_runs():
    from services.tracking import stage_params

    raw = {"distill": {"method": "darwin", "settings": {"darwin": {"eps": 0.03}, "rslad": {"eps": 0.03}},
                       "method_optim": {"rslad": {"lr": 0.05}}},
           "run": {"seed": 0, "precision": "auto", "compile": "auto"}, "export": {"opset": 18}}
    logged = stage_params(raw, ("distill", "run"))
    assert logged == {"distill": {"method": "darwin", "method_optim": {}}, "run": {"seed": 0}}
    assert raw["distill"]["settings"]["rslad"]  # the params themselves untouched


def test_the_stage_configuration_is_what_mlflow_logged_and_is_gathered_untracked_too(tmp_path, monkeypatch):
    """``stage_run``'s tracker gathers every params dict the stage logs (services/tracking.py
    stage_config, then the resolved parts): the configuration file is that object, the MLflow run's
    params are it flattened, and with tracking off the same object is gathered (and the file written)."""
    import json

    import mlflow

    from services.common import cli, parser
    from services.tracking import current

    write_params(tmp_path / "params.yaml", tiny_params(str(tmp_path / "raw")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("ROBUSTKD_PARENT_RUN_ID", raising=False)

    def main(args):
        current().log_params({"method": {"name": "darwin", "eps": 8 / 255, "pool": ("same", "other")},
                              "run": {"precision": "fp32"}})
        args.tracker.log_params({"inputs": {"data": "0123abcd"}})

    configs = {}
    for tracking in ("on", "off"):
        monkeypatch.setenv("ROBUSTKD_TRACKING", tracking)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        cli(main, lambda: parser("x"), "distill", ("distill", "run"), config=tmp_path / f"{tracking}.json")([])
        configs[tracking] = json.loads((tmp_path / f"{tracking}.json").read_text())
    config = configs["on"]
    assert config == configs["off"]
    assert config["method"] == {"name": "darwin", "eps": pytest.approx(8 / 255), "pool": ["same", "other"]}
    assert config["run"]["precision"] == "fp32" and isinstance(config["run"]["seed"], int)
    assert "settings" not in config["distill"] and set(config["distill"]["method_optim"]) <= {"darwin"}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("robustkd").experiment_id])
    assert run.data.params == flatten(config)
