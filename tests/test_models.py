import pytest
import torch

from robustkd.errors import InputError
from robustkd.checkpoints import load_checkpoint, save_checkpoint
from robustkd.models import available_models, count_parameters, create_model


@pytest.mark.parametrize("name,expected", [("resnet18", 11_173_962), ("mobilenetv2", 2_296_922),
                                           ("wrn34_10", 46_160_474)])
def test_parameter_counts_match_spec(name, expected):
    model = create_model(name, num_classes=10)
    assert count_parameters(model) == expected
    # every parameter is used by the forward pass
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_forwards(name):
    model = create_model(name, num_classes=100).eval()
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_model_normalises_inside():
    model = create_model("resnet10_w8").eval()
    x = torch.full((1, 3, 32, 32), 0.5)
    norm = model.normalize(x)
    assert torch.allclose(norm[0, :, 0, 0], (0.5 - model.normalize.mean.flatten()) / model.normalize.std.flatten())


def test_width_option_and_checkpoint_round_trip(tmp_path):
    model = create_model("resnet18", num_classes=10, width=8)
    model(torch.rand(4, 3, 32, 32))  # move BN running stats off their defaults
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, method="darwin", epoch=3)
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.arch == "resnet18" and loaded.options["width"] == 8
    assert loaded.checkpoint_meta == {"method": "darwin", "epoch": 3}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_unknown_model_name_is_rejected():
    with pytest.raises(InputError, match="unknown model name 'resnet19'.*resnet18"):
        create_model("resnet19")


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(create_model("resnet10_w8"), path)
    with pytest.raises(InputError, match="holds architecture 'resnet10_w8', expected 'mobilenetv2'"):
        load_checkpoint(path, expect_arch="mobilenetv2")


def test_corrupt_or_foreign_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt cannot be read"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(InputError, match="lacks keys"):
        load_checkpoint(foreign)
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
