"""torchrun with gloo on the CPU, 2 processes, against one process: the same weights after a
short DARWIN epoch (same global batch), the same per-image evaluation results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


# The worker's settings per method (on top of the method's Method.tiny): DARWIN without random
# starts, as the test was written; GACD one attack step.
SETTINGS = {"darwin": {"steps": 2, "random_start": False}, "gacd": {"steps": 1}}


def run_worker(out: Path, nproc: int, method: str = "darwin") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env["DDP_TEST_METHOD"] = method
    env["DDP_TEST_SETTINGS"] = json.dumps(SETTINGS[method])
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "ddp_worker.py"), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return run_worker(tmp / "one", 1), run_worker(tmp / "two", 2), tmp


def test_two_processes_train_the_same_weights_as_one(runs):
    one, two, tmp = runs
    assert (one["world_size"], two["world_size"]) == (1, 2)
    a = torch.load(tmp / "one/student.pt", weights_only=True)
    b = torch.load(tmp / "two/student.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        # measured: max |difference| 1.3e-8 (the order of float sums in the all-reduce)
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)


def test_sharded_evaluation_gives_exactly_the_single_process_results(runs):
    one, two, _ = runs
    assert set(one["correct"]) == {"natural", "pgd20", "cw", "autoattack"}
    for name in one["correct"]:
        assert two["correct"][name] == one["correct"][name], name
        assert len(one["correct"][name]) == 30


def test_gacd_memory_bank_and_heads_stay_identical_across_ranks(tmp_path):
    run_worker(tmp_path, 2, method="gacd")
    a = torch.load(tmp_path / "objective_rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "objective_rank1.pt", weights_only=True)
    assert "state.memory.memory_v1" in a and a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # an epoch over the 32 images moved every row: momentum update, then unit norm
    assert torch.allclose(a["state.memory.memory_v1"].norm(dim=1), torch.ones(32), atol=1e-5)


def test_the_process_group_is_destroyed_when_a_stage_ends(tmp_path):
    """Each rank joins through robustkd.distributed.init_distributed and exits without calling
    cleanup() (as a stage that raises does): the group is destroyed at exit all the same. An
    exit handler registered before the join runs after the library's (LIFO) and reports."""
    import socket

    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, sys, torch.distributed as dist\n"
        "atexit.register(lambda: print('initialised at exit:', dist.is_initialized(), flush=True))\n"
        f"sys.path.insert(0, {str(HERE.parent)!r})\n"
        "from robustkd.distributed import init_distributed\n"
        "info, _ = init_distributed('cpu')\n"
        "assert info.world_size == 2\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "initialised at exit: False" in out, out + err[-2000:]
