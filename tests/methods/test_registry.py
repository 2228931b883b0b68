"""The method registry's contract: every method runs through one interface."""

import dataclasses

import pytest
import torch

from robustkd.data import Batch
from robustkd.errors import InputError
from robustkd.methods import DataInfo, available_methods, create_objective, get_method, standin_settings
from robustkd.models import create_model

# The slides' methods (students and teacher) and the project's references: the registry must hold
# at least these; every test below runs over whatever the registry holds (available_methods()).
SLIDES = {"trades", "ard", "iad", "rslad", "crdnd", "gacd", "darwin", "darwin_lf"}


def data_info(student, teacher, n=6):
    return DataInfo(num_classes=10, labels=torch.arange(n) % 10, student_feature_dim=student.feature_dim,
                    teacher_feature_dim=teacher.feature_dim)


def test_the_registry_holds_every_method_of_the_slides():
    assert SLIDES <= set(available_methods())
    assert get_method("crdnd").reconstruction and get_method("gacd").reconstruction
    assert get_method("gacd").label == "gacd (reconstruction)"
    assert not get_method("rslad").reconstruction


@pytest.mark.parametrize("name", available_methods())
def test_every_method_states_its_contract(name):
    m = get_method(name)
    assert m.source and m.summary
    assert m.role in ("teacher", "student")
    assert set(m.tiny) <= {f.name for f in dataclasses.fields(m.config)}, m.tiny
    for dataset, sched in m.schedules.items():
        assert sched.source, (name, dataset)
        assert sched.official == ("[choice]" not in sched.source), (name, sched.source)
    assert not (m.reconstruction and any(s.official for s in m.schedules.values())), \
        f"{name}: a reconstruction has no official code, so no official schedule"


@pytest.mark.parametrize("name", available_methods())
def test_every_objective_runs_on_the_stand_ins(name, small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    obj = create_objective(name, standin_settings(name, steps=1), data=data_info(student, teacher))
    loss, parts = obj(student, teacher, Batch(x, y, xp, yp, index=torch.arange(6)), epoch=100)
    assert torch.isfinite(loss) and parts, name
    loss.backward()


def test_objectives_reject_unknown_settings():
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
