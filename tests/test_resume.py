"""Resume only into the same run: every input that decides the result is in the checkpoint's
fingerprint; a checkpoint of another run is set aside (renamed, never deleted) with one line
naming the input that differs, and the run starts fresh."""

import torch

from robustkd.data import ImageSet, TrainBatches
from robustkd.engine import OptimConfig, RunConfig, Trainer
from robustkd.methods import create_objective
from robustkd.models import create_model
from services.training import data_hash


def dataset(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 4, list("abcd"))


def teacher(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet10_w8", num_classes=4).eval()


def trainer(ckpt_dir, lines, data=None, teacher_model=None, width=8, seed=3):
    data = data or dataset()
    torch.manual_seed(1)
    student = create_model("resnet10", num_classes=4, width=width)
    batches = TrainBatches(data, 16, torch.device("cpu"))
    return Trainer(student, create_objective("rslad", {"steps": 1}), batches,
                   OptimConfig(epochs=2, batch_size=16, lr=0.05, schedule="cosine"),
                   RunConfig(seed=seed, device="cpu", checkpoint_dir=str(ckpt_dir)),
                   teacher=teacher_model or teacher(), inputs={"data": data_hash(data, None, None, 0.0)},
                   log=lines.append)


def killed_after_one_epoch(ckpt_dir):
    trainer(ckpt_dir, []).fit(stop_after_epoch=1)
    assert (ckpt_dir / "state.pt").exists()


def test_the_same_run_resumes(tmp_path):
    killed_after_one_epoch(tmp_path)
    lines = []
    assert trainer(tmp_path, lines).try_resume()
    assert "resumed" in lines[-1]


def check_set_aside(tmp_path, lines, word, fresh_checkpoint=False):
    stale = list(tmp_path.glob("state.pt.stale-*"))
    assert len(stale) == 1 and (tmp_path / "state.pt").exists() == fresh_checkpoint
    said = [line for line in lines if "not of this run" in line]
    assert len(said) == 1 and word in said[0] and stale[0].name in said[0], lines


def test_other_teacher_weights_start_fresh(tmp_path):
    killed_after_one_epoch(tmp_path)
    lines = []
    t = trainer(tmp_path, lines, teacher_model=teacher(seed=5))
    assert not t.try_resume()
    check_set_aside(tmp_path, lines, "teacher weights")


def test_other_data_content_starts_fresh(tmp_path):
    killed_after_one_epoch(tmp_path)
    data = dataset()
    data.images[0, 0, 0, 0] ^= 1  # one pixel of one image
    lines = []
    assert not trainer(tmp_path, lines, data=data).try_resume()
    check_set_aside(tmp_path, lines, "data")


def test_other_seed_starts_fresh(tmp_path):
    killed_after_one_epoch(tmp_path)
    lines = []
    assert not trainer(tmp_path, lines, seed=4).try_resume()
    check_set_aside(tmp_path, lines, "seed")


def test_other_model_options_start_fresh_and_train(tmp_path):
    """A student option changed: no size-mismatch error, now or on the next run."""
    killed_after_one_epoch(tmp_path)
    lines = []
    t = trainer(tmp_path, lines, width=4)
    history = t.fit()
    assert [h["epoch"] for h in history] == [1, 2]
    check_set_aside(tmp_path, lines, "model", fresh_checkpoint=True)
    assert trainer(tmp_path, [], width=4).try_resume()  # its own checkpoint resumes


def test_a_checkpoint_with_other_shapes_is_set_aside_even_with_the_same_fingerprint(tmp_path):
    killed_after_one_epoch(tmp_path)
    lines = []
    t = trainer(tmp_path, lines, width=4)
    t.fingerprint = trainer(tmp_path / "other", []).fingerprint  # as if the options were not hashed
    assert not t.try_resume()
    assert "model shapes differ" in lines[-1] and list(tmp_path.glob("state.pt.stale-*"))
