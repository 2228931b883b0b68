"""One short DARWIN epoch and a sharded evaluation, run by tests/test_distributed.py either as
one process (``python tests/ddp_worker.py OUT``) or under ``torchrun --nproc_per_node=2``.

The models have no batch norm: with batch norm each rank normalises with its own shard's
statistics (SyncBatchNorm is GPU-only in PyTorch), which is a real, explained difference from
one process. DARWIN's random start is off for the same reason: each rank would draw its own noise.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustkd.data import ImageSet, TrainBatches, to_float  # noqa: E402
from robustkd.distributed import cleanup, init_distributed  # noqa: E402
from robustkd.engine import OptimConfig, RunConfig, Trainer  # noqa: E402
from robustkd.evaluation import EvalConfig, evaluate_model  # noqa: E402
from robustkd.methods import DataInfo, create_objective, get_method, standin_settings  # noqa: E402
from robustkd.models import create_model  # noqa: E402


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def data(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.arange(n) % 10, [f"c{i}" for i in range(10)])


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info, device = init_distributed("cpu")
    train = data(32, seed=1)
    method = os.environ.get("DDP_TEST_METHOD", "darwin")
    settings = standin_settings(method, json.loads(os.environ.get("DDP_TEST_SETTINGS", "{}")))
    if get_method(method).build_state is not None:   # heads over penultimate features: a registry ResNet
        torch.manual_seed(0)
        student, teacher = create_model("resnet10_w8"), create_model("resnet10_w8").eval()
        objective = create_objective(method, settings,
                                     data=DataInfo(10, train.labels, student.feature_dim, teacher.feature_dim))
    else:
        student, teacher = small_cnn(0), small_cnn(1).eval()
        objective = create_objective(method, settings)
    batches = TrainBatches(train, 16, device, with_partners=True, rank=info.rank, world_size=info.world_size)
    trainer = Trainer(student, objective, batches, OptimConfig(epochs=1, batch_size=16, lr=0.05, schedule="constant"),
                      RunConfig(seed=0, device="cpu", progress_every_s=1e9), teacher=teacher, is_main=info.is_main)
    history = trainer.fit()
    if objective.state is not None:   # every rank's memory bank and heads, to compare across ranks
        out.mkdir(parents=True, exist_ok=True)
        torch.save(objective.state_dict(), out / f"objective_rank{info.rank}.pt")
        cleanup()
        return

    test = data(30, seed=2)
    cfg = EvalConfig(attacks=["natural", "pgd20", "cw", "autoattack"], pgd_steps=3, cw_steps=3, batch_size=8)
    results = evaluate_model(teacher, to_float(test.images), test.labels, cfg, device,
                             log=lambda *_: None, rank=info.rank, world_size=info.world_size)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(student.state_dict(), out / "student.pt")
        (out / "result.json").write_text(json.dumps({
            "loss": history[-1]["loss"], "world_size": info.world_size,
            "correct": {k: v.int().tolist() for k, v in results.correct.items()}}))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
