"""PyTorch distributed, as launched by ``torchrun``: process group, DDP wrapping, gathering.

One process (no ``WORLD_SIZE`` in the environment, or 1) runs exactly as before. Under
``torchrun --nproc_per_node=N`` (one or several nodes) each process reads ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``, joins the process group (NCCL on GPUs, gloo on CPUs) and:

- sees its shard of every global batch (robustkd.data.TrainBatches draws the global batch, so the
  partner sampling and the real/generated mixing are those of a single process);
- trains a DistributedDataParallel model: gradients are averaged over ranks, so with equal shards
  the update is the single-process update of the global batch;
- batch norm: each rank normalises with its own shard's statistics (standard DDP), running
  statistics are broadcast from rank 0 at each forward; ``sync_bn`` converts to SyncBatchNorm
  (GPU only in PyTorch), which normalises with the global batch's statistics.
- only rank 0 writes checkpoints, metrics and tracking records (``is_main``).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import InputError
from .utils import select_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_preference: str = "auto", backend: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns (info, this process's device)."""
    world = env_world_size()
    device = select_device(device_preference)
    if world <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this "
                             "node: lower run.nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        # Destroyed at the end of every torchrun stage, whichever way the stage ends (NCCL warns
        # and may hang at exit on a group never destroyed); cleanup() twice is harmless.
        atexit.register(cleanup)
    return DistInfo(rank, world, local_rank, backend), device


def current() -> DistInfo:
    """The DistInfo of an initialised process group (one process otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when a process group of 2+ ranks exists."""
    if not current().distributed:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise InputError("run.sync_bn: SyncBatchNorm needs GPUs (PyTorch supports it on CUDA only); "
                             "set run.sync_bn: false on CPUs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in one process)."""
    info = current()
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def average_scalars(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each scalar (per-epoch loss figures); identity in one process."""
    if not current().distributed or not values:
        return values
    keys = sorted(values)
    gathered = all_gather_objects([values[k] for k in keys])
    return {k: sum(g[i] for g in gathered) / len(gathered) for i, k in enumerate(keys)}


def global_max(t: torch.Tensor) -> torch.Tensor:
    """The max of a scalar tensor over all ranks (itself in one process): a batch-wide max taken
    over the global batch, as one process would see it."""
    if not current().distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks (itself in one process)."""
    if not current().distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (equal shapes) concatenated in rank order (``t`` in one process)."""
    if not current().distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(current().world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def average_gradients(params) -> None:
    """Average the gradients of parameters outside DistributedDataParallel (a method's heads)."""
    if not current().distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(current().world_size)
