"""The method registry's contract: every method runs through one interface."""

import pytest
import torch

from robustkd.data import Batch
from robustkd.errors import InputError
from robustkd.methods import DataInfo, available_methods, create_objective, get_method
from robustkd.models import create_model

EVERY = ["natural", "trades", "pgd_at", "natural_kd", "ard", "iad", "rslad", "adaad", "darwin",
         "darwin_lf", "crdnd", "gacd", "at_prm"]


def data_info(student, teacher, n=6):
    return DataInfo(num_classes=10, labels=torch.arange(n) % 10, student_feature_dim=student.feature_dim,
                    teacher_feature_dim=teacher.feature_dim)


def test_the_registry_holds_every_method_of_the_slides():
    assert set(EVERY) == set(available_methods())
    for name in EVERY:
        m = get_method(name)
        assert m.source and m.summary
        assert m.role in ("teacher", "student")
    assert get_method("crdnd").reconstruction and get_method("gacd").reconstruction
    assert get_method("gacd").label == "gacd (reconstruction)"
    assert not get_method("rslad").reconstruction


def test_every_objective_runs_and_rejects_unknown_settings(small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    for name in EVERY:
        settings = {} if name.startswith("natural") else {"steps": 1}
        if name == "gacd":
            settings["nce_k"] = 4
        if name == "at_prm":
            settings["ard"] = False   # ARD gates transformer blocks: the small models are CNNs
        obj = create_objective(name, settings, data=data_info(student, teacher))
        loss, parts = obj(student, teacher, Batch(x, y, xp, yp, index=torch.arange(6)), epoch=100)
        assert torch.isfinite(loss) and parts, name
        loss.backward()
    with pytest.raises(InputError, match=r"method darwin: unknown key\(s\) \['stpes'\]"):
        create_objective("darwin", {"stpes": 3})
    with pytest.raises(InputError, match="unknown method 'dawrin'"):
        create_objective("dawrin")
    assert create_objective("darwin_lf").config.label_free


@pytest.mark.parametrize("name", ["ard", "rslad", "darwin", "trades", "crdnd"])
def test_attack_settings_in_pixel_units_with_a_hint(name):
    with pytest.raises(InputError, match=r"eps: expected a value in \[0, 1\].*found 8 \(did you mean 8/255\?\)"):
        create_objective(name, {"eps": 8})


def test_official_schedules_and_dataset_branches():
    assert get_method("rslad").schedules["cifar10"].epochs == 300
    assert get_method("ard").schedules["cifar10"].milestones == (100,)      # the coded single decay
    assert get_method("rslad").schedules["cifar10"].milestones == (215, 260, 285)
    assert get_method("adaad").schedules["cifar10"].weight_decay == 5e-4
    assert create_objective("rslad", dataset="cifar100").config.kl_scale == 10.0
    assert create_objective("rslad", {"kl_scale": 1.0}, dataset="cifar100").config.kl_scale == 1.0
    assert create_objective("adaad", dataset="cifar10").config.kl_reduction == "elementwise_mean"
    assert create_objective("adaad", dataset="cifar100").config.kl_reduction == "batchmean"


def test_stateful_methods_need_the_data_and_expose_trainable_heads():
    with pytest.raises(InputError, match="memory bank"):
        create_objective("gacd")
    s, t = create_model("resnet10_w8"), create_model("resnet10_w8")
    obj = create_objective("gacd", {"nce_k": 4}, data=data_info(s, t))
    assert sum(p.numel() for p in obj.parameters()) > 0          # the projection heads
    assert "state.memory.memory_v1" in obj.state_dict()          # checkpointed with the run
    assert obj.needs_index and not create_objective("rslad").needs_index
