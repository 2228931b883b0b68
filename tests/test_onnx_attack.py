"""The deployed file attacked (services/onnx_attack.py): the ONNX session as a torch module, Square on
it and PGD-20 transferred to it, the promotion rule, the input check at load and the served decode.

The models are linear (tests/conftest.py, FixedLinear), so that robustness is known by hand: the
"robust" model's clean margins (about 920) exceed what any eps = 8/255 perturbation can move
(eps ||w_y - w_c||_1, about 96). Its "altered" copy adds weights orthogonal to every test image:
the same clean logits (parity on clean images passes) but a perturbation moves its logits by
thousands, so an attack on the file finds what the clean parity check cannot.
"""

import io
import json

import numpy as np
import pytest
import torch

from tests.conftest import FixedLinear
from robustkd.errors import InputError
from robustkd.evaluation import EvalConfig

D, CLASSES, PER_CLASS = 3 * 32 * 32, 10, 2


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2, (CLASSES, D), generator=g).float() * 2 - 1          # +-1 per class
    y = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    mix = 0.02 * torch.rand(len(y), 1, generator=g)
    x = (0.5 + 0.3 * patterns[y] + mix * patterns[(y + 1) % CLASSES]).reshape(-1, 3, 32, 32)
    # directions orthogonal to every test image: span{1, patterns} projected out of random rows
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(1, D), patterns]).T)              # D x 11, orthonormal
    noise = torch.randn(CLASSES, D, generator=g)
    hidden = noise - (noise @ basis) @ basis.T
    hidden = hidden / hidden.abs().mean(1, keepdim=True)
    return x, y, patterns, hidden


def _export(tmp_path, name, weight, classes=None):
    from services.onnx_export import export

    model = FixedLinear(weight, torch.zeros(CLASSES)).eval()
    path = tmp_path / f"{name}.onnx"
    export(model, path, 18, {"classes": json.dumps(classes or [f"c{i}" for i in range(CLASSES)])})
    return model, path


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    x, y, patterns, hidden = data
    tmp = tmp_path_factory.mktemp("onnx")
    robust, robust_path = _export(tmp, "robust", patterns)
    _, altered_path = _export(tmp, "altered", patterns + 1000.0 * hidden)
    return robust, robust_path, altered_path


CFG = EvalConfig(eps=8 / 255, pgd_steps=5, pgd_step_size=2 / 255, batch_size=8, seed=0)


def test_onnx_module_gives_the_sessions_logits_without_gradients(data, files):
    from services.onnx_attack import OnnxModule

    x, y, _, _ = data
    robust, robust_path, _ = files
    module = OnnxModule(robust_path)
    z = module(x.requires_grad_(False))
    assert torch.allclose(z, robust(x), atol=1e-3) and not z.requires_grad
    assert module.predict(x, batch_size=7).tolist() == y.tolist()
    with pytest.raises(RuntimeError):   # a gradient attack cannot run on the file
        module(x.clone().requires_grad_(True)).sum().backward()


def test_square_and_transfer_on_the_file_see_an_altered_export(data, files):
    from services.tables import onnx_block_reason
    from services.onnx_attack import attack_onnx

    x, y, _, _ = data
    robust, robust_path, altered_path = files
    good = attack_onnx(robust, robust_path, x, y, CFG, square_queries=20)
    bad = attack_onnx(robust, altered_path, x, y, CFG, square_queries=20)
    n = len(y)
    for r in (good, bad):
        assert r["robust_images"] == n and r["onnx_natural_accuracy"]["correct"] == n   # clean parity holds
        assert r["torch_pgd20_accuracy"]["correct"] == n                                 # the student is robust
        rec = r["onnx_square_accuracy"]
        assert rec["total"] == n and rec["ci95_low"] <= rec["percent"] <= rec["ci95_high"]
    assert good["onnx_square_accuracy"]["correct"] == n and good["onnx_pgd20_transfer_accuracy"]["correct"] == n
    assert bad["onnx_square_accuracy"]["correct"] <= n // 2        # the altered file is not robust
    assert bad["onnx_pgd20_transfer_accuracy"]["correct"] < n      # nor to the student's own PGD images
    assert onnx_block_reason(good) == ""
    reason = onnx_block_reason(bad)
    assert "ONNX Square accuracy" in reason and f"same {n} images" in reason


def test_square_stays_in_the_threat_model(data, files):
    from services.onnx_attack import OnnxModule, square_adversarial

    x, y, _, _ = data
    adv = square_adversarial(OnnxModule(files[2]), x, y, 8 / 255, 10, seed=0, batch_size=8)
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6 and 0 <= float(adv.min()) and float(adv.max()) <= 1


def test_promotion_is_blocked_when_the_file_is_less_robust():
    from pipeline.registry import CHALLENGER, CHAMPION, decide_alias
    from robustkd.stats import accuracy_record

    def attacked(square):
        return {"square_queries": 1000, "onnx_square_accuracy": accuracy_record(square, 100),
                "torch_pgd20_accuracy": accuracy_record(30, 100)}

    new = {"natural": 43.0, "autoattack": 27.0}
    assert decide_alias({**new, "onnx_attack": attacked(29)}, None, 1.0).alias == CHAMPION   # within the interval
    blocked = decide_alias({**new, "onnx_attack": attacked(15)}, None, 1.0)
    assert blocked.alias == CHALLENGER and "below the PyTorch PGD-20 interval" in blocked.reason
    better_than_champion = {"natural": 43.0, "autoattack": 25.0}
    assert decide_alias({**new, "onnx_attack": attacked(15)}, better_than_champion, 1.0).alias == CHALLENGER
    assert decide_alias({**new, "onnx_attack": attacked(15)}, None, 1.0, block_onnx=False).alias == CHAMPION


def _graph(tmp_path, name, elem, shape):
    import onnx
    from onnx import helper

    inp = helper.make_tensor_value_info("image", elem, shape)
    out = helper.make_tensor_value_info("logits", elem, None)
    graph = helper.make_graph([helper.make_node("Flatten", ["image"], ["logits"])], "g", [inp], [out])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("elem, shape, found", [
    ("FLOAT", ["N", 1, 32, 32], "tensor(float) [N, 1, 32, 32]"),        # grey-scale
    ("FLOAT", ["N", 3072], "tensor(float) [N, 3072]"),                    # flattened
    ("UINT8", ["N", 3, 32, 32], "tensor(uint8) [N, 3, 32, 32]"),        # bytes, not [0, 1] floats
])
def test_a_file_of_another_input_fails_at_load_with_one_line(tmp_path, elem, shape, found):
    from onnx import TensorProto

    from pipeline.onnx_student import OnnxStudent
    from services.onnx_attack import OnnxModule

    path = _graph(tmp_path, "bad.onnx", getattr(TensorProto, elem), shape)
    for load in (OnnxModule, OnnxStudent):
        with pytest.raises(InputError) as err:
            load(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and found in message
        assert "expected one float32 input N x 3 x H x W" in message


def test_the_server_refuses_a_fixed_size_it_does_not_send(tmp_path):
    from onnx import TensorProto

    from pipeline.onnx_student import OnnxStudent

    path = _graph(tmp_path, "big.onnx", TensorProto.FLOAT, ["N", 3, 64, 64])
    with pytest.raises(InputError, match="H x W = 32 x 32"):
        OnnxStudent(path)


def _png(array_hwc: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array_hwc).save(buf, format="PNG")
    return buf.getvalue()


def test_the_served_decode_gives_the_array_paths_predictions(data, files):
    """PNG bytes through the server's decode and resize (pipeline/onnx_student.decode_image_bytes)
    and the uint8 arrays through the stages' to_float give the same pixels and the same answers;
    a 64 x 64 upload (each pixel doubled) is resized by the server and still gets them."""
    from pipeline.onnx_student import OnnxStudent, decode_image_bytes
    from robustkd.data import to_float

    x, y, _, _ = data
    u8 = (x * 255).round().to(torch.uint8)                      # what a test set holds
    student = OnnxStudent(files[1])
    arrays = to_float(u8).numpy()
    hwc = u8.permute(0, 2, 3, 1).numpy()
    decoded = np.stack([decode_image_bytes(_png(img)) for img in hwc])
    np.testing.assert_array_equal(decoded, arrays)
    by_array = [p["class_index"] for p in student.predict(arrays)]
    assert by_array == y.tolist()
    assert [p["class_index"] for p in student.predict(decoded)] == by_array
    doubled = np.stack([decode_image_bytes(_png(img.repeat(2, 0).repeat(2, 1))) for img in hwc])
    assert doubled.shape == arrays.shape
    assert [p["class_index"] for p in student.predict(doubled)] == by_array
    assert student.predict(decoded)[0]["class"] == "c0"


def test_the_export_stage_attacks_the_file_on_the_headline_images(tmp_path, monkeypatch):
    """The stage on a tiny profile (an untrained student: the figures are not the point, the images
    and the records are): the attacked images are the headline images the evaluation chooses
    (services.results.headline_indices), counts and intervals in metrics/export.json, and the
    report's section names the count."""
    from robustkd.data import ImageSet
    from robustkd.checkpoints import save_checkpoint
    from robustkd.models import create_model
    from services.common import save_imageset
    from services.params import load_params
    from services.results import headline_indices
    from stages import export_onnx
    from stages.report import deployed_file_attacked
    from tests.stage_fixtures import CLASSES, tiny_params, write_params

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_params(str(tmp_path / "raw")))
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(3)
    save_imageset(ImageSet(torch.randint(0, 256, (30, 3, 32, 32), generator=g, dtype=torch.uint8), labels, CLASSES),
                  tmp_path / "data/prepared/test.npz")
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet10_w8"), tmp_path / "models/student.pt", method="darwin")
    export_onnx.run([])
    figures = json.loads((tmp_path / "metrics/export.json").read_text())
    params = load_params(tmp_path / "params.yaml")
    headline = headline_indices(params, labels, 10)
    assert len(headline) == figures["robust_images"] == 10 and figures["square_queries"] == 30
    assert sorted(labels[headline].tolist()) == list(range(10))          # one per class
    for key in ("onnx_square_accuracy", "onnx_pgd20_transfer_accuracy", "torch_pgd20_accuracy",
                "onnx_natural_accuracy", "torch_natural_accuracy"):
        rec = figures[key]
        assert rec["total"] == 10 and rec["ci95_low"] <= rec["percent"] <= rec["ci95_high"], key
    # the file is the student: the transferred PGD-20 fools it exactly as it fools PyTorch
    assert figures["onnx_pgd20_transfer_accuracy"] == figures["torch_pgd20_accuracy"]
    section = deployed_file_attacked(figures, 8 / 255)
    assert section["title"] == "The deployed file attacked (10 images)" and "on 10 images" in section["markdown"]
    assert "L-inf eps 8/255" in section["markdown"]


def test_a_less_robust_file_is_registered_as_challenger_with_its_onnx_tags(tmp_path, monkeypatch, files):
    """In a real SQLite MLflow store: the first version would be champion, but its file's Square
    accuracy lies below the PyTorch PGD-20 interval, so it is challenger; the ONNX figures are tags."""
    import mlflow

    from pipeline import registry
    from robustkd.stats import accuracy_record
    from services.tracking import MLFLOW_ENV, keep_environment, setup_mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_mlflow(tmp_path)
    attacked = {"robust_images": 100, "square_queries": 1000, "onnx_square_accuracy": accuracy_record(12, 100),
                "onnx_pgd20_transfer_accuracy": accuracy_record(20, 100), "torch_pgd20_accuracy": accuracy_record(30, 100)}
    metrics = {"natural": 43.0, "autoattack": 27.0, "onnx_attack": attacked}
    with keep_environment(*MLFLOW_ENV):
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        version, decision = registry.register_onnx(files[2], metrics, {"method": "darwin", "dataset": "cifar10"},
                                                   "robustkd-student", 1.0, log=lambda *_: None)
        tags = mlflow.MlflowClient().get_model_version("robustkd-student", version).tags
    assert decision.alias == registry.CHALLENGER and tags["alias_reason"] == decision.reason
    assert "below the PyTorch PGD-20 interval" in decision.reason
    assert tags["onnx_square"] == "12.00" and tags["onnx_square_count"] == "12/100" and tags["onnx_blocked"] == "1"
    assert tags["onnx_pgd20_transfer"] == "20.00" and tags["onnx_attack_images"] == "100"
    assert tags["torch_pgd20_ci95"].startswith("[")


def test_the_attacked_images_are_the_first_of_each_class_of_the_headline():
    from robustkd.data import stratified_first_k
    from stages.export_onnx import first_per_class

    labels = torch.tensor([3, 1, 3, 0, 1, 1, 0, 3, 2, 2])
    assert first_per_class(labels, 2).tolist() == stratified_first_k(labels, 2, 4).tolist() == [0, 1, 2, 3, 4, 6, 8, 9]
    assert first_per_class(labels[:2], 10).tolist() == [0, 1]     # a smoke run's two headline images
