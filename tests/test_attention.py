"""Grad-CAM maps (robustkd/attention.py): a hand-computed map on a model whose gradients are known,
the default layer of each architecture family, and parity with the grad-cam package when installed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustkd.attention import available_backend, grad_cam, grad_cam_builtin, layer_for
from robustkd.errors import InputError
from robustkd.models import create_model


class PooledLinear(nn.Module):
    """x -> 8x8 average pool (the mapped layer sees a 4 x 4 grid) -> spatial mean -> linear. The
    gradient of logit c at cell (i, j) of channel k is W[c, k] / 16, so Grad-CAM is
    relu(sum_k W[c, k] A_k) up to scale."""

    def __init__(self, weight):
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(3, len(weight), bias=False)
        self.fc.weight.data = torch.tensor(weight, dtype=torch.float32)

    def forward(self, x):
        return self.fc(self.feat(F.avg_pool2d(x, 8)).mean((2, 3)))


def test_the_map_lights_the_cells_that_raise_the_target_logit():
    model = PooledLinear([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 0:8, 24:32] = 1.0        # channel 0 in grid cell (0, 3): top right
    x[0, 1, 24:32, 0:8] = 0.5        # channel 1 in grid cell (3, 0): bottom left
    layer = model.feat
    # bilinear upsampling with half-pixel centres: the hot cell is 1 at its outer corner pixels
    top_right = grad_cam_builtin(model, layer, x, torch.tensor([0]))[0]
    assert top_right.shape == (32, 32) and top_right.max() == pytest.approx(1.0, abs=1e-6)
    assert top_right[1, 30] == pytest.approx(1.0, abs=1e-6) and top_right[16:, :16].max() == 0
    bottom_left = grad_cam_builtin(model, layer, x, torch.tensor([1]))[0]
    assert bottom_left[30, 1] == pytest.approx(1.0, abs=1e-6) and bottom_left[:16, 16:].max() == 0
    # channel 0 lowers logit 2: nothing raises it, the map is zero everywhere
    assert grad_cam_builtin(model, layer, x, torch.tensor([2])).abs().max() == 0


@pytest.mark.parametrize("arch, options, grid", [("resnet10_w8", {}, 4),
                                                 ("wrn34_10", {"depth": 10, "widen_factor": 1}, 8),
                                                 ("mobilenetv2", {"width_mult": 0.25}, 4)])
def test_each_family_has_a_layer_and_maps_in_the_unit_range(arch, options, grid):
    torch.manual_seed(0)
    model = create_model(arch, 10, **options).train()
    x = torch.rand(3, 3, 32, 32)
    path = layer_for(arch)
    acts = {}
    model.get_submodule(path).register_forward_hook(lambda m, i, o: acts.update(shape=o.shape))
    maps, backend = grad_cam(model, path, x, torch.tensor([0, 1, 2]), backend="builtin")
    assert acts["shape"][-1] == grid and backend == "builtin"
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert model.training                           # the caller's mode is restored


def test_unknown_layers_and_backends_are_named():
    model = create_model("resnet10_w8")
    with pytest.raises(InputError, match="backbone.layer4"):
        grad_cam(model, "backbone.layer4", torch.rand(1, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(InputError, match="attention.layers"):
        layer_for("swin_t")
    assert layer_for("swin_t", {"swin_t": "backbone.blocks.11.norm1"}) == "backbone.blocks.11.norm1"
    assert layer_for("vit_b_4") == "backbone.vit.blocks.-1.norm1"   # ViTs: the last block, tokens to a grid
    with pytest.raises(InputError, match="expected auto"):
        available_backend("captum")


def test_the_builtin_maps_equal_the_grad_cam_packages():
    pytest.importorskip("pytorch_grad_cam")
    from robustkd.attention import grad_cam_package

    torch.manual_seed(0)
    model = create_model("resnet10_w8").eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    layer = model.get_submodule(layer_for("resnet10_w8"))
    assert (grad_cam_builtin(model, layer, x, y) - grad_cam_package(model, layer, x, y)).abs().max() < 1e-4


def test_the_stage_draws_the_three_models_on_the_same_clean_and_pgd_images(tmp_path, monkeypatch):
    import json

    from PIL import Image

    from robustkd.data import ImageSet
    from robustkd.checkpoints import save_checkpoint
    from services.common import save_imageset
    from stages import attention

    from .stage_fixtures import CLASSES, tiny_params, write_params

    torch.manual_seed(0)
    images = (torch.rand(20, 3, 32, 32) * 255).to(torch.uint8)
    (tmp_path / "data/prepared").mkdir(parents=True)
    save_imageset(ImageSet(images, torch.arange(20) % 10, list(CLASSES)), tmp_path / "data/prepared/test.npz")
    (tmp_path / "models").mkdir()
    for name, arch in (("teacher", "resnet10_w16"), ("student", "resnet10_w8"), ("reference", "resnet10_w8")):
        save_checkpoint(create_model(arch), tmp_path / f"models/{name}.pt")
    params = tiny_params(str(tmp_path))
    params["attention"] = {"images": 3, "layers": {"resnet10_w16": "backbone.layers.2"}, "backend": "auto",
                           "attack_model": "student"}
    params["evaluate"]["config"]["pgd_steps"] = 2
    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    attention.run([])
    with Image.open(tmp_path / "reports/attention.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
    info = json.loads((tmp_path / "metrics/attention_info.json").read_text())
    assert info["test_indices"] == [0, 1, 2] and info["labels"] == [0, 1, 2]
    assert info["layers"]["teacher"] == "resnet10_w16: backbone.layers.2"
    assert info["layers"]["student"] == "resnet10_w8: backbone.layers"
    assert set(info["predictions"]) == {f"{m} {k}" for m in ("teacher", "student", "reference")
                                        for k in ("clean", "PGD-2")}
    assert "PGD-2 against the student" in info["attack"]
