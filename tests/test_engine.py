import torch

from robustkd.data import ImageSet, TrainBatches
from robustkd.engine import OptimConfig, RunConfig, Trainer, lr_factor
from robustkd.methods import create_objective
from robustkd.models import create_model


def test_schedules():
    assert lr_factor("piecewise", 74.9, 110, [75, 90, 100], 0.1, 0) == 1.0
    assert abs(lr_factor("piecewise", 75.0, 110, [75, 90, 100], 0.1, 0) - 0.1) < 1e-12
    assert abs(lr_factor("piecewise", 101, 110, [75, 90, 100], 0.1, 0) - 1e-3) < 1e-12
    assert lr_factor("cosine", 0, 10, [], 0.1, 0) == 1.0 and abs(lr_factor("cosine", 10, 10, [], 0.1, 0)) < 1e-12
    assert lr_factor("onecycle", 1.5, 10, [], 0.1, 0.3) == 0.5
    assert lr_factor("onecycle", 3, 10, [], 0.1, 0.3) == 1.0


def make_trainer(tmp_path, teacher):
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.arange(48) % 4, list("abcd"))
    torch.manual_seed(1)
    student = create_model("resnet10_w8", num_classes=4)
    obj = create_objective("darwin", {"steps": 2})
    batches = TrainBatches(data, 16, torch.device("cpu"), with_partners=True)
    return Trainer(student, obj, batches, OptimConfig(epochs=3, batch_size=16, lr=0.05, schedule="cosine"),
                   RunConfig(seed=3, device="cpu", checkpoint_dir=str(tmp_path)), teacher=teacher)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    torch.manual_seed(2)
    teacher = create_model("resnet10_w8", num_classes=4).eval()
    full = make_trainer(tmp_path / "full", teacher)
    history = full.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3]

    first = make_trainer(tmp_path / "killed", teacher)
    first.fit(stop_after_epoch=1)  # as if killed after epoch 1
    resumed = make_trainer(tmp_path / "killed", teacher)
    resumed_history = resumed.fit()
    assert resumed.start_epoch == 1
    assert [h["epoch"] for h in resumed_history] == [1, 2, 3]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    teacher = create_model("resnet10_w8", num_classes=4).eval()
    make_trainer(tmp_path, teacher).fit(stop_after_epoch=1)
    other = make_trainer(tmp_path, teacher)
    other.optim_cfg.lr = 0.2  # a different run
    from robustkd.engine import fingerprint
    other.fingerprint = fingerprint("changed")
    assert not other.try_resume()


def test_max_batches_cuts_each_epoch_and_the_schedule_follows():
    """optim.max_batches (the presets' smoke runs): each epoch stops after that many batches, and
    the learning-rate schedule counts those batches, so the cosine still ends at zero."""
    import pytest

    from robustkd.errors import InputError

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.arange(48) % 4, list("abcd"))
    torch.manual_seed(1)
    trainer = Trainer(create_model("resnet10_w8", num_classes=4), create_objective("natural"),
                      TrainBatches(data, 8, torch.device("cpu")),
                      OptimConfig(epochs=2, batch_size=8, lr=0.05, schedule="cosine", max_batches=2),
                      RunConfig(seed=0, device="cpu"))
    history = trainer.fit()
    assert trainer.iters_per_epoch == 2 and [h["epoch"] for h in history] == [1, 2]
    assert trainer.scheduler.last_epoch == 4 and trainer.optimizer.param_groups[0]["lr"] < 1e-12
    with pytest.raises(InputError, match="max_batches"):
        OptimConfig(max_batches=0)
