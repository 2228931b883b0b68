"""Faults a long run meets, each made to happen: a NaN loss, a truncated or foreign checkpoint, a
full disk, a kill during the checkpoint write, an unreachable MLflow server. Each ends with a clear
line and nothing already produced lost."""

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustkd.errors import NonFiniteLoss, OutputError
from robustkd.models import create_model

from .stage_fixtures import make_image_folder, tiny_params, write_params
from .test_resume import trainer

ROOT = Path(__file__).resolve().parents[1]


def teacher4():
    torch.manual_seed(2)
    return create_model("resnet10_w8", num_classes=4).eval()


def a_torch_file(path: Path):
    torch.save({"weights": torch.zeros(4096)}, path)


# ------------------------------------------------------------------ NaN / inf in the loss
def test_a_nan_loss_stops_training_naming_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path):
    t = teacher4()
    run = trainer(tmp_path, [], teacher_model=t)
    saved = {}

    def poison_teacher_after_epoch_1(epoch, metrics):  # as if the weights went bad in epoch 2
        saved["state"] = (tmp_path / "state.pt").read_bytes()
        with torch.no_grad():
            next(t.parameters()).fill_(float("nan"))

    run.callbacks.append(poison_teacher_after_epoch_1)
    with pytest.raises(NonFiniteLoss) as err:
        run.fit()
    msg = str(err.value)
    assert "the training loss is nan at epoch 2, batch 1 of 2" in msg
    assert f"the last good checkpoint {tmp_path / 'state.pt'} (after epoch 1) is kept" in msg
    assert (tmp_path / "state.pt").read_bytes() == saved["state"]
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 1


# ------------------------------------------------------------------ checkpoints set aside
class Code:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def truncated(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("make,reason", [
    (truncated, "unreadable: truncated or corrupt"),
    (lambda p: torch.save({"arch": "resnet10", "options": {}, "state_dict": {}}, p),
     "not a training checkpoint of this project: expected keys"),
    (lambda p: torch.save(torch.zeros(3), p), "found Tensor"),
    (lambda p: torch.save({"state": Code()}, p),
     "it holds pickled code or objects (posix.system), refused by torch.load(weights_only=True)"),
    (lambda p: p.write_text("not a checkpoint"), "unreadable: not a torch checkpoint"),
])
def test_a_truncated_or_foreign_checkpoint_is_set_aside_with_a_message(tmp_path, make, reason):
    a_torch_file(tmp_path / "state.pt")
    make(tmp_path / "state.pt")
    lines = []
    t = trainer(tmp_path, lines)
    assert not t.try_resume()
    said = [line for line in lines if "not of this run" in line]
    assert len(said) == 1 and reason in said[0], lines
    stale = list(tmp_path.glob("state.pt.stale-*"))
    assert len(stale) == 1 and stale[0].name in said[0] and not (tmp_path / "state.pt").exists()


def test_a_second_set_aside_checkpoint_does_not_overwrite_the_first(tmp_path):
    for _ in range(2):
        a_torch_file(tmp_path / "state.pt")
        truncated(tmp_path / "state.pt")
        assert not trainer(tmp_path, []).try_resume()
    assert sorted(p.name for p in tmp_path.glob("state.pt.stale-*")) == ["state.pt.stale-unreadable",
                                                                        "state.pt.stale-unreadable.1"]


def test_only_the_newest_set_aside_checkpoints_are_kept(tmp_path):
    from robustkd.engine import STALE_KEPT
    lines: list[str] = []
    for n in range(STALE_KEPT + 2):
        a_torch_file(tmp_path / "state.pt")
        truncated(tmp_path / "state.pt")
        os.utime(tmp_path / "state.pt", (1_000_000 + n, 1_000_000 + n))   # written in this order
        assert not trainer(tmp_path, lines).try_resume()
    kept = sorted(int(p.stat().st_mtime) - 1_000_000 for p in tmp_path.glob("state.pt.stale-*"))
    assert kept == list(range(2, STALE_KEPT + 2)), kept          # the newest ones, by write time
    assert sum("only the newest" in line for line in lines) == 2, lines


# ------------------------------------------------------------------ files as a user expects
def test_atomic_writes_follow_the_umask_and_clean_a_killed_writes_leftover(tmp_path):
    from robustkd.utils import atomic_path
    out = tmp_path / "student.pt"
    leftover = tmp_path / ".student.pt.abc123.tmp"     # what a kill during a write leaves
    leftover.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"whole")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"whole"
    assert (out.stat().st_mode & 0o777) == 0o644      # mkstemp alone gives 0600
    assert not leftover.exists() and not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------ full disk, unwritable outputs
def test_a_full_disk_at_the_checkpoint_write_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path,
                                                                                            monkeypatch):
    run = trainer(tmp_path, [])
    real_save = torch.save
    calls = []

    def save_on_a_full_disk(obj, fh):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of epoch 2: some bytes, then no space left
            fh.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, fh)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(OutputError) as err:
        run.fit()
    assert err.value.errno == errno.ENOSPC
    assert err.value.strerror == (f"cannot write {tmp_path / 'state.pt'}: No space left on device "
                                  f"(the previous file is kept as it was)")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary file left


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "raw", train_per_class=3, test_per_class=1)
    p = tiny_params(str(tmp_path / "raw"))
    p["data"].update(train_per_class=2, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)   # at most data.test_per_class (checked at load)
    write_params(tmp_path / "params.yaml", p)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "off")
    from stages import prepare_data

    prepare_data.run([])
    return tmp_path


def outputs(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for d in ("data", "metrics") for p in (root / d).rglob("*")
            if p.is_file()}


def test_a_stage_on_a_full_disk_exits_with_one_line_and_keeps_the_previous_outputs(prepared, monkeypatch, capsys):
    import numpy as np

    from stages import prepare_data

    before = outputs(prepared)
    capsys.readouterr()

    def savez_on_a_full_disk(fh, **arrays):
        fh.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    with pytest.raises(SystemExit) as err:
        prepare_data.run([])
    assert err.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: cannot write data/prepared/train.npz: No space left on "
                                               "device (the previous file is kept as it was)")
    assert outputs(prepared) == before


def test_a_stage_whose_output_directory_cannot_be_made_exits_with_one_line(prepared, capsys):
    from stages import prepare_data

    before = outputs(prepared)
    for p in (prepared / "metrics").iterdir():
        p.unlink()
    (prepared / "metrics").rmdir()
    (prepared / "metrics").write_text("a file where the stage needs a folder")
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        prepare_data.run([])
    assert err.value.code == 1
    msg = capsys.readouterr().err.strip()
    assert msg.startswith("error: cannot write metrics/") and "nothing was written" in msg, msg
    assert {k: v for k, v in outputs(prepared).items() if k.startswith("data/")} == \
        {k: v for k, v in before.items() if k.startswith("data/")}


# ------------------------------------------------------------------ killed during the checkpoint write
KILLED_DURING_WRITE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from tests.test_resume import trainer
real_save, calls = torch.save, []
def save(obj, fh):
    calls.append(1)
    if len(calls) == 2:  # the checkpoint of epoch 2, half written
        fh.write(b"PK\\x03\\x04 half a checkpoint")
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, fh)
torch.save = save
trainer({ckpt!r}, []).fit()
"""


def test_a_stage_killed_during_the_checkpoint_write_resumes_to_the_uninterrupted_result(tmp_path):
    ckpt = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_WRITE.format(root=str(ROOT), ckpt=str(ckpt))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = list(ckpt.glob(".state.pt.*.tmp"))
    assert len(leftovers) == 1 and torch.load(ckpt / "state.pt", weights_only=True)["epoch"] == 1

    lines = []
    resumed = trainer(ckpt, lines)
    resumed.fit()
    assert resumed.start_epoch == 1 and not list(ckpt.glob(".state.pt.*.tmp"))
    assert any("removed 1 unfinished checkpoint write" in line for line in lines), lines

    full = trainer(tmp_path / "full", [])
    full.fit()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------ MLflow unreachable
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed again when the socket is: nothing listens there


def test_an_unreachable_mlflow_server_leaves_the_stage_untracked_and_says_so(tmp_path):
    make_image_folder(tmp_path / "raw", train_per_class=3, test_per_class=1)
    p = tiny_params(str(tmp_path / "raw"))
    p["data"].update(train_per_class=2, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)   # at most data.test_per_class (checked at load)
    write_params(tmp_path / "params.yaml", p)
    env = {**os.environ, "ROBUSTKD_TRACKING": "on", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}",
           "ROBUSTKD_TRACKING_ATTEMPTS": "2", "PYTHONPATH": str(ROOT)}
    # a hang fails the test through the timeout; MLflow's own defaults would retry for minutes
    proc = subprocess.run([sys.executable, "-m", "stages.prepare_data"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("tracking:")]
    assert len(said) == 1, proc.stderr[-3000:]
    assert "opening the MLflow run at http://127.0.0.1:" in said[0] and "failed 2 times" in said[0]
    assert said[0].endswith("the stage goes on untracked")
    assert (tmp_path / "data/prepared/train.npz").is_file() and (tmp_path / "metrics/data_card.json").is_file()


def test_a_damaged_mlflow_store_leaves_the_stage_untracked_in_one_line_and_its_outputs_written(tmp_path):
    make_image_folder(tmp_path / "raw", train_per_class=3, test_per_class=1)
    p = tiny_params(str(tmp_path / "raw"))
    p["data"].update(train_per_class=2, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)   # at most data.test_per_class (checked at load)
    write_params(tmp_path / "params.yaml", p)
    (tmp_path / "mlflow.db").write_bytes(b"not sqlite " * 1000)       # "file is not a database"
    env = {**os.environ, "ROBUSTKD_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "ROBUSTKD_TRACKING_ATTEMPTS": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare_data"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("tracking:")]
    assert len(said) == 1 and "the store is damaged" in said[0] and "goes on untracked" in said[0], said
    assert (tmp_path / "metrics/data_card.json").is_file()


@pytest.mark.slow   # SQLite's busy timeout (5 s) per try, and MLflow's own store set-up
def test_a_store_locked_in_the_middle_of_a_run_leaves_the_rest_untracked_and_the_work_goes_on(
        tmp_path, monkeypatch, capsys):
    """A SQLite store held by another writer (BEGIN EXCLUSIVE): the metrics of epoch 2 cannot be
    written; after the bounded retries the run says so once and goes on; the store is intact."""
    import sqlite3

    import mlflow

    from services.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "on")
    monkeypatch.setenv("ROBUSTKD_TRACKING_ATTEMPTS", "2")
    done = []
    with stage_run("unit") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        other = sqlite3.connect(tmp_path / "mlflow.db", timeout=0)
        other.execute("BEGIN EXCLUSIVE")
        tracker.log_metrics({"loss": 0.5}, step=2)   # the store is locked: retried, then untracked
        tracker.log_metrics({"loss": 0.25}, step=3)  # no second wait, no second message
        done.append("epoch 3")
        other.rollback()
        other.close()
    assert done == ["epoch 3"]
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tracking:")]
    assert len(said) == 1 and said[0].startswith("tracking: logging metrics at sqlite:///") and \
        "failed 2 times (MlflowException: (sqlite3.OperationalError) database is locked); the stage goes on untracked" in said[0], said
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [1.0]
