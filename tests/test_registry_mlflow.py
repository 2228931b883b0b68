"""What MLflow shows of a registered student, in a real SQLite store: signature and input example,
the version's description (method, teacher, data, evaluation with intervals) and its link to the
distill run that trained it; the datasets a stage run logs (mlflow.log_input with the data card's
hash). And, slow: ``mlflow models serve`` of the champion answers a request."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from .stage_fixtures import ROOT
from .test_serving import tiny_onnx

MODEL = "robustkd-student"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A distill stage run (with its datasets and checkpoint hash) and the student registered."""
    from robustkd.data import ImageSet
    from robustkd.data import imageset_sha256
    from services.results import read_evaluation
    from services.tracking import MLFLOW_ENV, keep_environment, setup_mlflow, stage_run

    from pipeline import registry

    root = tmp_path_factory.mktemp("registry")
    old = os.getcwd()
    os.chdir(root)
    saved = {k: os.environ.get(k) for k in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    os.environ["DVC_ROOT"] = str(root)
    try:
        g = torch.Generator().manual_seed(0)
        train = ImageSet(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.arange(20) % 10, [f"c{i}" for i in range(10)])
        checkpoint = root / "student.pt"
        checkpoint.write_bytes(b"the student's weights")
        with stage_run("distill") as tracker:
            tracker.log_imageset(train, root / "data/prepared/train.npz", "train", "training")
            tracker.set_tags({"stage": "distill",
                              "checkpoint_sha256": registry.sha256_file(checkpoint)})
            train_run_id = tracker.run_id
        evaluation = read_evaluation(ROOT / "metrics/evaluate/student.json")   # headline + details
        tags = {"method": "darwin", "student": "resnet10_w8", "teacher": "resnet10_w16", "dataset": "cifar10",
                "profile": "cpu", "eval_images": evaluation["num_images"], "eval_subset": "first 10 per class",
                "eval_images_sha256": "ab" * 32, "eval_flagged": 0}
        setup_mlflow(root)
        with keep_environment(*MLFLOW_ENV):
            import mlflow
            mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
            version, decision = registry.register_onnx(tiny_onnx(root / "student.onnx"), evaluation, tags, MODEL, 1.0,
                                                       checkpoint=checkpoint)
            yield {"root": root, "version": version, "decision": decision, "train_run_id": train_run_id,
                   "evaluation": evaluation, "train_sha": imageset_sha256(train), "client": mlflow.MlflowClient()}
    finally:
        os.chdir(old)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_signature_and_input_example(registered):
    import mlflow

    info = mlflow.models.get_model_info(f"models:/{MODEL}/{registered['version']}")
    inputs, outputs = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert inputs[0].shape == (-1, 3, 32, 32) and inputs[0].type == np.dtype(np.float32)
    assert outputs[0].shape == (-1, 10)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    example = model.input_example
    assert example.shape == (2, 3, 32, 32) and example.dtype == np.float32 and 0 <= example.min() <= example.max() <= 1
    logits = model.predict(example)
    logits = next(iter(logits.values())) if isinstance(logits, dict) else np.asarray(logits)
    assert logits.shape == (2, 10)


def test_description_and_training_run_link(registered):
    client, ev = registered["client"], registered["evaluation"]
    v = client.get_model_version(MODEL, registered["version"])
    text = v.description
    aa = ev["accuracy"]["autoattack"]
    for words in ("darwin", "resnet10_w16", "cifar10", f"{ev['autoattack']:.2f}",
                  f"[{aa['ci95_low']:.1f}, {aa['ci95_high']:.1f}]", "N x 3 x 32 x 32", "8/255"):
        assert words in text, (words, text)
    assert v.tags["training_run_id"] == registered["train_run_id"]
    assert f"runs/{registered['train_run_id']}?workflowType=machine_learning)" in text
    assert "champion" in client.get_registered_model(MODEL).description
    # the training run carries the student's headline evaluation: MLflow's compare view shows it
    trained = client.get_run(registered["train_run_id"]).data.metrics
    assert trained["eval_autoattack"] == pytest.approx(float(v.tags["autoattack"]), abs=0.01)
    assert {"eval_natural", "eval_pgd20", "eval_worst_case", "eval_images"} <= set(trained)


def test_stage_run_logs_its_dataset_with_the_data_card_hash(registered):
    run = registered["client"].get_run(registered["train_run_id"])
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "train" and ds.dataset.digest == registered["train_sha"][:16]
    tags = {t.key: t.value for t in ds.tags}
    assert tags["sha256"] == registered["train_sha"] and tags["mlflow.data.context"] == "training"
    assert tags["num_images"] == "20"


def test_imageset_hash_is_the_data_cards(tmp_path):
    """The hash runs log is the one prepare_data writes in the data card (after the npz round trip)."""
    from robustkd.data import ImageSet
    from robustkd.data import imageset_sha256
    from services.common import load_imageset, save_imageset
    from stages.prepare_data import card

    data = ImageSet(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2]),
                    ["a", "b", "c"])
    save_imageset(data, tmp_path / "x.npz")
    assert imageset_sha256(load_imageset(tmp_path / "x.npz")) == card(data)["sha256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_for_the_champion(registered):
    root, port = registered["root"], free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
           # the scoring server runs `uvicorn` from PATH: this environment's
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    mlflow_cli = [sys.executable, "-m", "mlflow"]
    proc = subprocess.Popen(mlflow_cli + ["models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
                                          "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow models serve did not start: {proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
        body = json.dumps({"inputs": np.random.default_rng(1).random((3, 3, 32, 32)).tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())["predictions"]
        logits = np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)
        assert logits.shape == (3, 10)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def test_the_project_experiment_opens_in_the_model_training_view(tmp_path, monkeypatch):
    """MLflow 3 shows an untagged experiment in its GenAI view; the project's is tagged model training,
    also when it was created before (by an older version) without the tag."""
    import mlflow

    from services.tracking import EXPERIMENT_KIND, MODEL_TRAINING, ensure_project_experiment
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        ensure_project_experiment(mlflow, "fresh", tmp_path)
        old = mlflow.create_experiment("older")
        ensure_project_experiment(mlflow, "older", tmp_path)
        for name in ("fresh", "older"):
            assert mlflow.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND) == MODEL_TRAINING
        assert mlflow.get_experiment_by_name("older").experiment_id == old
    finally:
        mlflow.set_tracking_uri(None)
