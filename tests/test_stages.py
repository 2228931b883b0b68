"""Each stage CLI on tiny data, in a temporary working directory."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkd.checkpoints import load_checkpoint

from .stage_fixtures import copy_project, write_params


@pytest.fixture(scope="module")
def workdir(tiny_repro, tmp_path_factory):
    """A working directory where the tiny pipeline ran once (a copy of the session's `dvc repro`,
    tests/conftest.py tiny_repro), the current directory while the module's tests run."""
    import os

    wd = copy_project(tiny_repro, tmp_path_factory.mktemp("stages"))
    old = os.getcwd()
    os.chdir(wd)
    try:
        yield wd
    finally:
        os.chdir(old)


def test_prepare_data_outputs(workdir):
    card = json.loads((workdir / "metrics/data_card.json").read_text())
    assert card["train"]["num_images"] == 60 and card["heldout"]["num_images"] == 10
    assert card["test"]["per_class"] == {f"c{i}": 3 for i in range(10)}


def test_teacher_and_students_are_checkpoints(workdir):
    for name in ("teacher", "student", "reference"):
        model = load_checkpoint(workdir / "models" / f"{name}.pt")
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert load_checkpoint(workdir / "models/student.pt").checkpoint_meta["method"] == "darwin"
    history = (workdir / "metrics/student_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,arkd,iakd,dbkd") and len(history) == 3


def _numbers_only(obj, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _numbers_only(v, f"{where}/{k}")
    else:
        assert isinstance(obj, (int, float)) and not isinstance(obj, bool), (where, obj)


def test_evaluate_writes_every_attack(workdir):
    from services.results import HEADLINE_NUMBERS, read_evaluation

    for name in ("teacher", "student"):
        headline = json.loads((workdir / f"metrics/evaluate/{name}.json").read_text())
        # a DVC metrics file: the headline numbers, flat; the other numbers in <name>_details.json,
        # the words in <name>_info.json
        _numbers_only(headline)
        assert set(headline) == set(HEADLINE_NUMBERS), sorted(headline)
        details = json.loads((workdir / f"metrics/evaluate/{name}_details.json").read_text())
        _numbers_only(details)
        assert {"accuracy", "per_class_accuracy", "checks", "headline"} <= set(details)
        m = read_evaluation(workdir / f"metrics/evaluate/{name}.json")
        for key in ("natural", "pgd20", "cw", "autoattack", "worst_case"):
            assert 0.0 <= m[key] <= 100.0
            acc = m["accuracy"][key]
            total = 10 if key in ("autoattack", "worst_case") else 20   # AutoAttack: 1 of the 2 per class
            assert acc["total"] == total and m[key] == round(100 * acc["correct"] / total, 2)
            assert acc["ci95_low"] <= m[key] <= acc["ci95_high"]
        assert m["accuracy"]["worst_case"]["correct"] <= m["accuracy"]["autoattack"]["correct"]
        assert m["num_images"] == 20 and m["per_class"] == 2
        assert len(m["per_class_accuracy"]["autoattack"]) == 10   # one image of each class
        assert m["flagged"] in (0, 1) and m["checks"]["pgd20"]["linf"] == 1
        info = json.loads((workdir / f"metrics/evaluate/{name}_info.json").read_text())
        assert info["arch"] == "resnet10_w8" and info["threat_model"]["norm"] == "Linf"
        assert info["subset"]["num_images"] == 20 and len(info["subset"]["images_sha256"]) == 64
        aa = info["attack_subsets"]["autoattack"]
        assert aa["num_images"] == 10 and aa["per_class"] == 1 and aa["images_sha256"] != info["subset"]["images_sha256"]
        assert info["flagged"] == bool(m["flagged"]) and set(info["failed_checks"]) <= set(info["checks"])
        # the stage reports its throughput per attack; evaluate.compile: auto is eager on a CPU
        assert info["compiled_parts"] == [] and info["precision"] == "fp32 (TF32 off)"
        assert {"natural", "pgd20", "cw", "autoattack"} <= set(info["speed"])   # and the masking checks
        assert info["speed"]["autoattack"]["images"] == 10 and info["speed"]["pgd20"]["images"] == 20
        assert all(v["images_per_s"] > 0 for v in info["speed"].values())
        per_image = np.load(workdir / f"metrics/evaluate/{name}_per_image.npz", allow_pickle=False)
        assert per_image["autoattack"].sum() == m["accuracy"]["autoattack"]["correct"]
        assert len(per_image["index"]) == 20 and len(per_image["autoattack_index"]) == 10
        # the AutoAttack images: the first of each class, a stratified subset of the evaluated ones
        assert set(per_image["autoattack_index"]) < set(per_image["index"])
        labels = dict(zip(per_image["index"], per_image["label"]))
        assert sorted(labels[i] for i in per_image["autoattack_index"]) == list(range(10))
    ref = read_evaluation(workdir / "metrics/evaluate/reference.json")
    assert set(ref["per_class_accuracy"]) == {"natural", "pgd20", "worst_case"}


def test_export_parity_and_report(workdir):
    export = json.loads((workdir / "metrics/export.json").read_text())
    assert export["max_abs_logit_diff"] < 1e-4 and export["prediction_agreement"] == 1.0
    assert set(export["latency"]) == {"batch1", "batch4"}
    import onnxruntime as ort
    session = ort.InferenceSession(str(workdir / "models/student.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # dynamic batch
        out = session.run(None, {"image": np.random.rand(batch, 3, 32, 32).astype(np.float32)})[0]
        assert out.shape == (batch, 10)
    html = (workdir / "reports/report.html").read_text()
    # offline: every figure inline; the only links are to the local MLflow UI's runs (make mlflow-ui)
    assert "data:image/png;base64," in html
    assert "http" not in html.replace("http-equiv", "").replace('href="http://127.0.0.1:', "")
    assert "| student (resnet10_w8) | darwin |" in (workdir / "reports/report.md").read_text()


def test_teacher_from_checkpoint(workdir, tmp_path, monkeypatch):
    import yaml
    from stages import train_teacher

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["teacher"].update(source="checkpoint", checkpoint=str(workdir / "models/teacher.pt"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    __import__("shutil").copytree(workdir / "data/prepared", tmp_path / "data/prepared")  # its classes
    monkeypatch.chdir(tmp_path)
    train_teacher.run([])
    assert load_checkpoint(tmp_path / "models/teacher.pt").arch == "resnet10_w8"
    params["teacher"]["checkpoint"] = str(tmp_path / "nope.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as err:
        train_teacher.run([])
    assert err.value.code == 2


def ingest_with(workdir, tmp_path, monkeypatch, arrays: dict, **ddpm):
    import shutil

    import yaml
    from stages import ingest_ddpm

    for sub in ("data", "models"):
        if not (tmp_path / sub).exists():
            shutil.copytree(workdir / sub, tmp_path / sub)
    np.savez(tmp_path / "gen.npz", **arrays)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["ddpm"].update(source="npz", files=[str(tmp_path / "gen.npz")], **ddpm)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    ingest_ddpm.run([])
    numbers = json.loads((tmp_path / "metrics/ddpm.json").read_text())
    # a DVC metrics file: plain numbers, one column each (the source and per-class counts: ddpm_info.json)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()), numbers
    return {**numbers,
            **json.loads((tmp_path / "metrics/ddpm_info.json").read_text())}


def generated(n=12, labels=True, seed=1):
    rng = np.random.default_rng(seed)
    out = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)}
    if labels:
        out["label"] = rng.integers(0, 10, n)
    return out


def test_ingest_valid_npz_subsample_dedupe_and_memory_map(workdir, tmp_path, monkeypatch):
    arrays = generated()
    test_images = np.load(workdir / "data/prepared/test.npz")["image"]
    arrays["image"][0] = test_images[0]  # a copy of a test image must be dropped
    report = ingest_with(workdir, tmp_path, monkeypatch, arrays, num_images=8)
    assert report["test_duplicates_dropped"] == 1 and report["num_images"] == 8
    assert report["labelled_by"] == "file" and sum(report["per_class"].values()) == 8
    images = np.load(tmp_path / "data/generated/images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap) and images.shape == (8, 32, 32, 3)


def test_ingest_without_labels_uses_teacher(workdir, tmp_path, monkeypatch):
    report = ingest_with(workdir, tmp_path, monkeypatch, generated(labels=False))
    assert report["labelled_by"] == "teacher" and report["num_images"] == 12
    conf = np.load(tmp_path / "data/generated/confidence.npy")
    assert conf.shape == (12,) and (conf > 0).all() and (conf <= 1).all()


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(image=a["image"].astype(np.float32)), "must be uint8"),
    (lambda a: a.update(image=a["image"][:, :, :30]), "N x 32 x 32 x 3"),
    (lambda a: a.pop("image"), "missing key 'image'"),
    (lambda a: a.update(label=a["label"] + 10), r"labels must lie in \[0, 9\]"),
    (lambda a: a.update(image=a["image"][:0], label=a["label"][:0]), "0 images"),
])
def test_broken_npz_fails_clearly_and_keeps_previous_outputs(workdir, tmp_path, monkeypatch, capsys,
                                                             mutate, message):
    ingest_with(workdir, tmp_path, monkeypatch, generated())
    before = {p.name: p.read_bytes() for p in (tmp_path / "data/generated").iterdir()}
    report_before = (tmp_path / "metrics/ddpm.json").read_bytes()
    arrays = generated(seed=2)
    mutate(arrays)
    with pytest.raises(SystemExit) as err:
        ingest_with(workdir, tmp_path, monkeypatch, arrays)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert "gen.npz" in stderr and __import__("re").search(message, stderr)
    after = {p.name: p.read_bytes() for p in (tmp_path / "data/generated").iterdir()}
    assert after == before and (tmp_path / "metrics/ddpm.json").read_bytes() == report_before


def test_params_typo_is_rejected(tmp_path, monkeypatch, workdir):
    import yaml
    from stages import train_teacher

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["teacher"]["optim"]["learning_rate"] = 0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train_teacher.run([])


def test_every_stage_run_is_an_mlflow_run(workdir):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("robustkd")
    all_runs = client.search_runs([exp.experiment_id])
    runs = {r.data.tags["dvc_stage"]: r for r in all_runs}
    assert {"prepare_data", "train_teacher", "ingest_ddpm", "distill", "evaluate", "export_onnx",
            "report"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    distill = next(r for r in all_runs if r.data.tags.get("method") == "darwin")
    assert distill.data.params["distill.method"] == "darwin" and distill.data.tags["git_commit"]
    # per-epoch metrics, loss parts included, one point per epoch
    for key in ("loss", "arkd", "iakd", "dbkd", "heldout_natural"):
        assert [m.step for m in client.get_metric_history(distill.info.run_id, key)] == [1, 2], key
    artifacts = {a.path for a in client.list_artifacts(distill.info.run_id)}
    assert {"student_history.csv", "student_train.json", "student.pt"} <= artifacts
    assert "student/autoattack" in runs["evaluate"].data.metrics
    assert "student.onnx" in {a.path for a in client.list_artifacts(runs["export_onnx"].info.run_id)}


def test_mlflow_records_the_method_that_ran_and_its_inputs(workdir):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("robustkd").experiment_id])
    reference = next(r for r in runs if r.data.tags.get("method") == "natural_kd")
    assert reference.data.params["distill.method"] == "natural_kd" == reference.data.params["method.name"]
    darwin = next(r for r in runs if r.data.tags.get("method") == "darwin")
    assert float(darwin.data.params["method.eps"]) == pytest.approx(8 / 255)  # a number, not "8/255"
    # only the method that ran, and the fast path as resolved on this machine (fp32 on a CPU), not "auto"
    assert not any(k.startswith("distill.settings.") for r in (darwin, reference) for k in r.data.params)
    assert not any("/255" in v for v in darwin.data.params.values())   # no unresolved fraction string
    assert darwin.data.params["run.precision"] == "fp32" and darwin.data.params["run.compile"] == "False"
    info = json.loads((workdir / "metrics/student_info.json").read_text())
    for key in ("teacher weights", "data", "model", "seed"):
        assert darwin.data.tags[f"input.{key.replace(' ', '_')}"] == info["inputs"][key]


# Each stage's resolved configuration (docs/pipeline.md#the-resolved-configuration-of-a-stage-run): the
# DVC stage of the tiny run -> the file beside its outputs.
CONFIG_FILES = {"prepare_data": "data_config.json", "train_teacher": "teacher_config.json",
                "ingest_ddpm": "ddpm_config.json", "distill": "student_config.json",
                "distill_reference": "reference_config.json", "evaluate": "evaluate_config.json",
                "export_onnx": "export_config.json", "attention": "attention_config.json",
                "report": "report_config.json"}


NUMBER_TEXT = re.compile(r"-?\d+(\.\d*)?([eE]-?\d+)?(\s*/\s*\d+(\.\d*)?)?|-?\.\d+")   # "8/255", "0.1", "2e-4"


def _latest_runs(workdir) -> dict:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("robustkd").experiment_id],
                              order_by=["attributes.start_time ASC"])
    return {r.data.tags["dvc_stage"]: r for r in runs}   # the last run of each stage wrote its file


def _leaves(obj, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{where}.{k}" if where else k)
    else:
        yield where, obj


def test_every_stage_writes_its_resolved_configuration_as_its_mlflow_run_logged_it(workdir):
    from services.tracking import flatten

    runs = _latest_runs(workdir)
    for stage, name in CONFIG_FILES.items():
        config = json.loads((workdir / "metrics" / name).read_text())
        assert config and flatten(config) == runs[stage].data.params, stage   # the same object, flattened
        for key, value in _leaves(config):   # numbers as numbers: no "8/255", no "0.1" strings
            digest = isinstance(value, str) and len(value) >= 16 and all(c in "0123456789abcdef" for c in value)
            assert digest or not (isinstance(value, str) and NUMBER_TEXT.fullmatch(value.strip())), (stage, key, value)
        assert not any(k.startswith(("distill.settings", "teacher.settings")) for k in flatten(config)), stage


def test_training_configurations_hold_what_ran(workdir):
    params = __import__("yaml").safe_load((workdir / "params.yaml").read_text())
    student = json.loads((workdir / "metrics/student_config.json").read_text())
    reference = json.loads((workdir / "metrics/reference_config.json").read_text())
    teacher = json.loads((workdir / "metrics/teacher_config.json").read_text())
    # the method as run, with its settings resolved, and no other method's settings or optimiser
    assert student["method"]["name"] == student["distill"]["method"] == "darwin"
    assert student["method"]["eps"] == pytest.approx(8 / 255)
    assert reference["method"]["name"] == reference["distill"]["method"] == params["distill"]["reference_method"]
    assert set(student["distill"]["method_optim"]) <= {"darwin"} and "settings" not in student["distill"]
    assert teacher["method"]["name"] == teacher["teacher"]["method"] and "settings" not in teacher["teacher"]
    # the optimiser as resolved and how it was set; the fast path as taken on this CPU; the seed
    assert student["optimiser"]["how"] == "shared (distill.optim)"
    assert student["optimiser"]["epochs"] == params["distill"]["optim"]["epochs"]
    for config in (student, reference, teacher):
        assert config["run"]["precision"] == "fp32" and config["run"]["compile"] is False
        assert config["run"]["seed"] == params["run"]["seed"]
    # the data identity: the hashes the run's resume compares, and those of the arrays it read
    info = json.loads((workdir / "metrics/student_info.json").read_text())
    assert student["inputs"] == {k.replace(" ", "_"): v for k, v in info["inputs"].items()}
    assert len(student["data_hash"]["train"]) == len(student["data_hash"]["heldout"]) == 16   # engine.array_hash
    assert student["data"]["source"] == params["data"]["source"]     # the params section, apart
    card = json.loads((workdir / "metrics/data_card.json").read_text())
    prepared = json.loads((workdir / "metrics/data_config.json").read_text())["prepared"]
    assert {s: prepared[s]["sha256"] for s in prepared} == {s: card[s]["sha256"] for s in ("train", "heldout", "test")}
    evaluated = json.loads((workdir / "metrics/evaluate_config.json").read_text())["evaluated"]
    student_eval = json.loads((workdir / "metrics/evaluate/student_info.json").read_text())
    assert evaluated["student"]["subset"]["images_sha256"] == student_eval["subset"]["images_sha256"]


def test_the_report_names_the_models_from_the_run_configurations(workdir):
    """The report's first line reads the teacher's and the student's method and architecture
    from the runs' configurations: what params.yaml said when they ran."""
    params = __import__("yaml").safe_load((workdir / "params.yaml").read_text())
    md = (workdir / "reports/report.md").read_text()
    assert (f"Student `{params['distill']['student']['arch']}` distilled with `{params['distill']['method']}` "
            f"from a `{params['teacher']['model']['arch']}` teacher ({params['teacher']['method']}).") in md


def test_metrics_files_hold_numbers_only(workdir):
    def numbers(obj):
        if isinstance(obj, dict):
            return all(numbers(v) for v in obj.values())
        return isinstance(obj, (int, float)) and not isinstance(obj, bool)

    for name in ("teacher_train", "student_train", "reference_train", "export"):
        assert numbers(json.loads((workdir / f"metrics/{name}.json").read_text())), name
    assert json.loads((workdir / "metrics/student_info.json").read_text())["method"] == "darwin"
    assert json.loads((workdir / "metrics/export_info.json").read_text())["checker"] == "passed"


def test_rerun_after_the_last_epoch_rewrites_outputs_dvc_removed(workdir, monkeypatch):
    """A kill after the last epoch's checkpoint: the rerun trains nothing but writes every output."""
    from stages import train_teacher

    monkeypatch.chdir(workdir)
    before = (workdir / "metrics/teacher_history.csv").read_text()
    for name in ("teacher_train.json", "teacher_history.csv"):
        (workdir / "metrics" / name).unlink()
    train_teacher.run([])
    assert (workdir / "metrics/teacher_history.csv").read_text() == before
    assert json.loads((workdir / "metrics/teacher_train.json").read_text())["epoch"] == 2


@pytest.mark.parametrize("method", ["crdnd", "gacd"])
def test_reconstructed_baselines_train_through_the_distill_stage(workdir, method, capsys):
    from stages import distill

    distill.run(["--method", method, "--out-dir", f"recon/{method}", "--seed", "7"])
    assert load_checkpoint(workdir / f"recon/{method}/{method}.pt").checkpoint_meta["method"] == method
    history = (workdir / f"recon/{method}/{method}_history.csv").read_text().splitlines()
    assert len(history) == 3 and "contrast" in history[0]
    assert "optimiser shared (distill.optim)" in capsys.readouterr().out
    state = torch.load(workdir / f"recon/{method}/checkpoint/state.pt", weights_only=True)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("robustkd").experiment_id])
    run = next(r for r in runs if r.data.tags.get("method") == method)
    assert run.data.params["run.seed"] == "7"  # --seed is the seed that ran and is recorded
    from services.tracking import flatten
    config = json.loads((workdir / f"recon/{method}/{method}_config.json").read_text())   # beside its info
    assert config["run"]["seed"] == 7 and config["method"]["name"] == method and flatten(config) == run.data.params
    if method == "gacd":   # heads and memory bank resume with the run
        assert "state.memory.memory_v1" in state["objective"] and "state.embed_s.linear.weight" in state["objective"]


@pytest.mark.slow
def test_stages_under_torchrun_write_once_and_match_the_single_process_evaluation(workdir):
    """run.nproc_per_node: 2 -> stages.launch starts torchrun (gloo); rank 0 alone writes."""
    import os
    import subprocess
    import sys

    import yaml

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["run"]["nproc_per_node"] = 2
    write_params(workdir / "params_2proc.yaml", params)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def launch(*args):
        proc = subprocess.run([sys.executable, "-m", "stages.launch", *args, "--params", "params_2proc.yaml"],
                              cwd=workdir, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    out = launch("distill", "--method", "rslad", "--out-dir", "ddp")
    assert "launching: " in out and "--nproc_per_node=2" in out, out[-3000:]
    assert load_checkpoint(workdir / "ddp/rslad.pt").checkpoint_meta["method"] == "rslad"
    assert len((workdir / "ddp/rslad_history.csv").read_text().splitlines()) == 3

    # GACD's memory bank and heads under torchrun: every rank applies the global batch's rows
    launch("distill", "--method", "gacd", "--out-dir", "ddp_gacd")
    assert load_checkpoint(workdir / "ddp_gacd/gacd.pt").checkpoint_meta["method"] == "gacd"

    launch("evaluate", "--model", "models/student.pt", "--out", "ddp/student_eval.json")
    from services.results import read_evaluation

    single = read_evaluation(workdir / "metrics/evaluate/student.json")
    sharded = read_evaluation(workdir / "ddp/student_eval.json")
    assert sharded["processes"] == 2
    for key in ("natural", "pgd20", "cw", "autoattack", "per_class_accuracy"):
        assert sharded[key] == single[key], (key, sharded[key], single[key])


def test_a_setting_that_crashes_stops_the_stage_in_one_line(workdir, tmp_path):
    """run.precision: bf16 on a machine where bf16 kills the process (SIGILL injected into the
    capability probe's child): the stage exits 2 with one line naming setting, device and signal."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    params = yaml.safe_load((wd / "params.yaml").read_text())
    params["run"]["precision"] = "bf16"
    (wd / "params.yaml").write_text(yaml.safe_dump(params))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ROBUSTKD_PROBE_FAULT": "bf16=SIGILL", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "stages.distill"], cwd=wd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run.precision: bf16 is not usable on cpu: its probe was killed by SIGILL"), last


def test_best_and_last_checkpoints(workdir):
    """Issue 24, item 3: each training stage keeps its best held-out checkpoint beside the last, the
    evaluation reports the student's both, labelled, and the report pairs them on the same images."""
    for name in ("teacher", "student", "reference"):
        best = load_checkpoint(workdir / "models" / f"{name}_best.pt")
        history = (workdir / f"metrics/{name}_history.csv").read_text().splitlines()
        assert 1 <= best.checkpoint_meta["best_epoch"] <= len(history) - 1
        assert json.loads((workdir / f"metrics/{name}_train.json").read_text())["best_epoch"] == \
            best.checkpoint_meta["best_epoch"]
    m = json.loads((workdir / "metrics/evaluate/student_best.json").read_text())
    info = json.loads((workdir / "metrics/evaluate/student_best_info.json").read_text())
    # the DVC metrics: the headline table's count (AutoAttack's half); every evaluated image per image
    assert m["num_images"] == 10 and info["best_checkpoint"]["checkpoint"] == "best"
    per_image = np.load(workdir / "metrics/evaluate/student_best_per_image.npz", allow_pickle=False)
    assert len(per_image["index"]) == 20
    report = (workdir / "reports/report.md").read_text()
    assert "## Best and last checkpoints" in report
    assert "| student (last) |" in report and "| student (best) |" in report and "exact McNemar p" in report
