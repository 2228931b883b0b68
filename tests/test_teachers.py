"""Released teachers (robustkd/teachers.py): files in the exact formats of the TRADES release and the
RobustBench zoo, built from transcriptions of the official architecture (tests/official_wrn.py),
give the transcription's logits once imported; any key that is neither used nor explicitly dropped
is an error naming it."""

import os
import re

import pytest
import torch

from robustkd.errors import InputError
from robustkd.models import count_parameters, create_model
from robustkd.checkpoints import ZooEntry, load_trades_release, read_state_dict, trades_wrn_to_project
from robustkd.teachers import CIFAR100_MEAN, CIFAR100_STD, ZOO, load_zoo_teacher

from .official_wrn import WideResNet, randomise, trades_wideresnet

SMALL = {"depth": 10, "widen_factor": 2}   # WRN-10-2: one block per stage, every kind of key, fast


def images(n=6, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_the_trades_release_format_gives_the_official_logits(tmp_path):
    official = randomise(trades_wideresnet(**SMALL))
    assert any(k.startswith("sub_block1.") for k in official.state_dict())
    path = tmp_path / "model_cifar_wrn.pt"
    torch.save(official.state_dict(), path)          # the release: a plain state dict
    model = load_trades_release(path, **SMALL)
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), official(x)) < 1e-5
        # [0, 1] input, no normalisation: the project's usual CIFAR statistics would change the logits
        assert model.options["mean"] == [0.0] * 3 and model.options["std"] == [1.0] * 3
        other = create_model("wrn34_10", 10, **SMALL)
        other.backbone.load_state_dict(model.backbone.state_dict())
        assert max_diff(other.eval()(x), official(x)) > 1e-2


@pytest.mark.parametrize("layout", ["state_dict+module", "model_state_dict", "plain+model", "no_sub_block1"])
def test_the_robustbench_zoo_layout_loads_with_the_entrys_normalisation(tmp_path, layout):
    official = randomise(WideResNet(num_classes=100, sub_block1=layout != "no_sub_block1", **SMALL), seed=3)
    state = official.state_dict()
    file = {"state_dict+module": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
            "model_state_dict": {"model_state_dict": state, "epoch": torch.tensor(3)},
            "plain+model": {f"model.{k}": v for k, v in state.items()},
            "no_sub_block1": state}[layout]
    entry = ZooEntry("Tiny2024", "cifar100", "wrn34_10", options=SMALL, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    entry.path(tmp_path).parent.mkdir(parents=True)
    torch.save(file, entry.path(tmp_path))
    assert entry.path(tmp_path) == tmp_path / "cifar100" / "Linf" / "Tiny2024.pt"
    model = load_zoo_teacher(entry, tmp_path)
    x = images()
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert max_diff(model(x), official((x - mean) / std)) < 1e-5
        assert max_diff(model(x), official(x)) > 1e-2      # the normalisation is applied inside


def test_the_file_is_read_without_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "opt": object()}, path)
    with pytest.raises(InputError, match="weights-only"):
        read_state_dict(path)


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"fc2.weight": torch.zeros(1)}), ["unexpected keys ['fc2.weight']"]),
    (lambda s: s.pop("block2.layer.0.convShortcut.weight"), ["missing keys ['block2.layer.0.convShortcut.weight']"]),
    (lambda s: s.update({"block3.layer.1.conv1.weight": torch.zeros(1)}),
     ["unexpected keys ['block3.layer.1.conv1.weight']"]),
    (lambda s: s.update({"block1.layer.0.conv1.weight": torch.zeros(32, 16, 1, 1)}),
     ["block1.layer.0.conv1.weight: file (32, 16, 1, 1), model (32, 16, 3, 3)"]),
    (lambda s: s.update({"fc.weight": torch.zeros(7, 128)}), ["fc.weight has 7 outputs"]),
])
def test_every_key_is_used_or_explicitly_dropped(tmp_path, edit, words):
    state = randomise(trades_wideresnet(**SMALL)).state_dict()
    edit(state)
    torch.save(state, tmp_path / "t.pt")
    with pytest.raises(InputError) as err:
        load_trades_release(tmp_path / "t.pt", **SMALL)
    for w in words:
        assert w in str(err.value)
    assert str(tmp_path / "t.pt") in str(err.value)


def test_files_of_old_pytorch_without_batch_counters_load(tmp_path):
    official = randomise(trades_wideresnet(**SMALL))
    torch.save({k: v for k, v in official.state_dict().items() if "num_batches_tracked" not in k}, tmp_path / "o.pt")
    with torch.no_grad():
        assert max_diff(load_trades_release(tmp_path / "o.pt", **SMALL)(images()), official(images())) < 1e-5


def test_wrn34_10_keys_and_shapes_map_onto_the_project_model():
    """The real WRN-34-10 (the TRADES release and every WRN-34-10 zoo entry), on the meta device:
    every key maps, nothing is missing, shapes agree; 46,160,474 parameters used."""
    with torch.device("meta"):
        official = trades_wideresnet()
        project = create_model("wrn34_10", 10)
    mapped, unexpected = trades_wrn_to_project(official.state_dict(), depth=34)
    target = project.backbone.state_dict()
    assert unexpected == [] and set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    dropped = [k for k in official.state_dict() if k.startswith("sub_block1.")]
    assert len(dropped) == 5 * 12 + 1 and len(mapped) + len(dropped) == len(official.state_dict())
    assert count_parameters(project.backbone) == 46_160_474


def test_a_missing_zoo_file_says_where_to_put_it(tmp_path):
    with pytest.raises(InputError) as err:
        load_zoo_teacher("Zhang2019Theoretically", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar10" / "Linf" / "Zhang2019Theoretically.pt") in msg
    assert "1hPz9QQwyM7QSuWu-ANG_uXR-29xtL8t_" in msg
    with pytest.raises(InputError, match=re.escape("expected one of")):
        load_zoo_teacher("Zhang2019", tmp_path)


def test_the_registry_states_architecture_normalisation_and_published_accuracy():
    trades = ZOO["Zhang2019Theoretically"]
    assert (trades.dataset, trades.arch, trades.clean, trades.autoattack) == ("cifar10", "wrn34_10", 84.92, 53.08)
    assert trades.mean == (0.0, 0.0, 0.0) and trades.std == (1.0, 1.0, 1.0)
    c100 = [e for e in ZOO.values() if e.dataset == "cifar100" and e.arch == "wrn34_10"]
    assert c100 and all(e.num_classes == 100 and 0 < e.autoattack < e.clean for e in c100)


# ---------------------------------------------------------------- through the train_teacher stage
def stage_dir(tmp_path, monkeypatch, **teacher):
    """A project folder with prepared data of ten classes and params whose teacher is ``teacher``."""
    import json

    from robustkd.data import ImageSet
    from services.common import save_imageset

    from .stage_fixtures import CLASSES, tiny_params, write_params

    data = ImageSet(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10), list(CLASSES))
    (tmp_path / "data/prepared").mkdir(parents=True)
    save_imageset(data, tmp_path / "data/prepared/train.npz")
    params = tiny_params(str(tmp_path))
    params["teacher"].update(model={"arch": "wrn34_10", "options": dict(SMALL)}, **teacher)
    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    return lambda: json.loads((tmp_path / "metrics/teacher_info.json").read_text())


def test_the_stage_takes_the_trades_release_as_a_checkpoint(tmp_path, monkeypatch):
    from robustkd.checkpoints import load_checkpoint
    from stages import train_teacher

    official = randomise(trades_wideresnet(**SMALL), seed=5)
    torch.save(official.state_dict(), tmp_path / "model_cifar_wrn.pt")
    info = stage_dir(tmp_path, monkeypatch, source="checkpoint", checkpoint=str(tmp_path / "model_cifar_wrn.pt"))
    train_teacher.run([])
    teacher = load_checkpoint(tmp_path / "models/teacher.pt")
    with torch.no_grad():
        assert max_diff(teacher(images()), official(images())) < 1e-5
    assert info()["normalisation"] == {"mean": [0.0] * 3, "std": [1.0] * 3}


def test_the_stage_takes_a_zoo_teacher_and_says_where_a_missing_file_goes(tmp_path, monkeypatch, capsys):
    from robustkd.checkpoints import load_checkpoint
    from stages import train_teacher

    entry = ZooEntry("Tiny2024", "cifar10", "wrn34_10", options=SMALL, clean=12.5, autoattack=3.5,
                     gdrive_id="abc")
    monkeypatch.setitem(ZOO, entry.name, entry)
    info = stage_dir(tmp_path, monkeypatch, source="zoo", zoo={"name": entry.name, "dir": "zoo", "download": False})
    with pytest.raises(SystemExit) as err:
        train_teacher.run([])
    assert err.value.code == 2 and "zoo/cifar10/Linf/Tiny2024.pt does not exist" in capsys.readouterr().err
    official = randomise(WideResNet(sub_block1=True, **SMALL), seed=6)
    entry.path("zoo").parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, entry.path("zoo"))
    train_teacher.run([])
    with torch.no_grad():
        assert max_diff(load_checkpoint("models/teacher.pt")(images()), official(images())) < 1e-5
    assert info()["published autoattack"] == 3.5 and info()["zoo name"] == "Tiny2024"


@pytest.mark.parametrize("zoo, model, key", [
    ({"name": "Nope2020"}, {"arch": "wrn34_10"}, "teacher.zoo.name"),
    ({"name": "Zhang2019Theoretically"}, {"arch": "resnet18"}, "teacher.model"),
])
def test_zoo_params_are_checked_when_the_file_is_read(tmp_path, zoo, model, key):
    from services.params import load_params

    from .stage_fixtures import tiny_params, write_params

    params = tiny_params(str(tmp_path))
    params["teacher"].update(source="zoo", zoo=zoo, model=model)
    with pytest.raises(InputError, match=re.escape(key)):
        load_params(write_params(tmp_path / "params.yaml", params))


@pytest.mark.slow
def test_dvc_repro_takes_the_released_trades_teacher_from_the_zoo_folder(tmp_path):
    """The real entry (WRN-34-10, random weights in RobustBench's file format) through `dvc repro`:
    the zoo folder is a dependency of train_teacher, so a changed file re-takes the teacher."""
    from robustkd.checkpoints import load_checkpoint

    from .stage_fixtures import project_copy, sh, tiny_params

    params = tiny_params("raw")
    params["teacher"].update(source="zoo", zoo={"name": "Zhang2019Theoretically", "dir": "teachers/zoo",
                                                "download": False}, model={"arch": "wrn34_10", "options": {}})
    repo = project_copy(tmp_path, params)
    official = randomise(trades_wideresnet(), seed=7)
    file = ZOO["Zhang2019Theoretically"].path(repo / "teachers/zoo")
    file.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, file)
    out = sh("dvc repro train_teacher", repo).stdout
    assert "Running stage 'train_teacher'" in out
    x = images(2)
    with torch.no_grad():   # random pre-activation WRN-34: logits of size ~500; float32 rounding of the pooling
        expected = official(x)
        assert max_diff(load_checkpoint(repo / "models/teacher.pt")(x), expected) < 1e-6 * expected.abs().max()
    assert "train_teacher" not in sh("dvc status train_teacher", repo).stdout
    torch.save({"state_dict": randomise(trades_wideresnet(), seed=8).state_dict()}, file)
    status = sh("dvc status train_teacher", repo).stdout
    assert "train_teacher" in status and "teachers/zoo" in status, status


class _Code:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("arch", ["resnet10_w8", "wrn34_10"])
def test_a_given_teacher_holding_code_is_refused_without_the_unsafe_hint(tmp_path, arch):
    """Refused pickles are explained as such (not 'read as the TRADES release'), and torch's advice to
    re-run with weights_only=False, which would run the code, is never passed on."""
    from types import SimpleNamespace

    from robustkd.errors import InputError
    from robustkd.checkpoints import read_state_dict
    from stages.train_teacher import load_given
    path = tmp_path / "teacher.pt"
    torch.save({"state": _Code()}, path)
    cfg = SimpleNamespace(source="checkpoint", checkpoint=str(path),
                          model=SimpleNamespace(arch=arch, options={}))
    for load in (lambda: load_given(cfg), lambda: read_state_dict(path)):
        with pytest.raises(InputError) as err:
            load()
        msg = str(err.value)
        assert "refused by torch.load(weights_only=True)" in msg, msg
        assert "set to `False`" not in msg and "weights_only=False" not in msg, msg
        assert "TRADES release" not in msg, msg
