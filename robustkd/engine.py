"""Training engine: SGD with the schedules of docs/methods.md, an atomic per-epoch checkpoint of
everything needed to resume (model, optimiser, scheduler, RNG states, epoch, history), and
per-epoch metrics handed to callbacks (the stages plug MLflow in there).

Randomness is re-seeded from (seed, epoch) at the start of every epoch, so a run killed after
epoch k and resumed ends with the same weights as an uninterrupted run on CPU.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn

from .capability import FastPath, device_name, resolve_fast_path
from .data import TrainBatches
from .distributed import average_gradients, average_scalars, wrap_ddp
from .errors import InputError, NonFiniteLoss
from .methods.registry import Objective
from .utils import (atomic_torch_save, autocast, load_error_reason, make_generator, progress,
                    remove_unfinished_writes, select_device)

# Set-aside checkpoints of other runs kept beside state.pt (the newest; older ones removed) [choice].
STALE_KEPT = 3

Callback = Callable[[int, dict], None]


@dataclass
class OptimConfig:
    """SGD and its learning-rate schedule. Epoch counts are in epochs of the batch provider."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    schedule: Literal["piecewise", "cosine", "onecycle", "constant"] = "piecewise"
    milestones: list[float] = field(default_factory=list)  # epochs where lr *= gamma (piecewise)
    gamma: float = 0.1
    onecycle_warmup: float = 0.3   # fraction of training spent rising to lr (onecycle)
    max_batches: int | None = None  # at most this many batches per epoch (None: all): the presets' smoke runs
    grad_clip: float | None = None  # clip the model's gradient norm to this before each step (None: no clipping)

    def __post_init__(self):
        for key in ("epochs", "batch_size", "lr"):
            if getattr(self, key) <= 0:
                raise InputError(f"optimiser.{key}: expected a positive number, found {getattr(self, key)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise InputError(f"optimiser.grad_clip: expected a positive number or null, found {self.grad_clip}")
        if self.max_batches is not None and self.max_batches < 1:
            raise InputError(f"optimiser.max_batches: expected a positive number or null, found {self.max_batches}")
        if self.schedule not in ("piecewise", "cosine", "onecycle", "constant"):
            raise InputError(f"optimiser.schedule: expected piecewise|cosine|onecycle|constant, "
                             f"found {self.schedule!r}")


@dataclass
class RunConfig:
    """How to run: seed, device, numerics and where the resumable checkpoint lives."""

    seed: int = 0
    device: str = "auto"
    # The fast path (robustkd.capability): each setting 'auto' (on for CUDA devices whose probe
    # passes, off elsewhere) or explicit (probed too; a failing probe stops the run in one line).
    precision: str = "fp32"       # auto | fp32 | bf16 (autocast; the losses stay in float32)
    channels_last: bool | str = False
    compile: bool | str = False   # torch.compile the trained model (attacks and loss run compiled)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    checkpoint_dir: str = ""      # empty: no checkpoint, no resume
    sync_bn: bool = False         # distributed runs: SyncBatchNorm (GPU only) instead of per-rank BN
    progress_every_s: float = 30.0
    # Non-finite loss check: on CUDA the flag stays on the device and is read every this many
    # steps and at the end of the epoch (no host synchronisation per step); every step on CPU.
    nonfinite_check_every: int = 50


def lr_factor(schedule: str, epoch_float: float, total_epochs: int, milestones, gamma: float,
              warmup: float) -> float:
    """Multiplier of the base lr at a (fractional) epoch."""
    if schedule == "constant":
        return 1.0
    if schedule == "piecewise":
        return gamma ** sum(math.floor(epoch_float) >= m for m in milestones)
    t = min(epoch_float / total_epochs, 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    # onecycle: linear rise to 1 over `warmup`, then cosine decay to 0
    if t < warmup:
        return t / warmup if warmup > 0 else 1.0
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1 - warmup, 1e-12)))


def build_optimizer(model: nn.Module, cfg: OptimConfig, iters_per_epoch: int, extra_params=()):
    """SGD over the model's parameters and ``extra_params`` (a method's heads) with the schedule."""
    params = list(model.parameters()) + list(extra_params)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: lr_factor(cfg.schedule, it / iters_per_epoch, cfg.epochs, cfg.milestones,
                                  cfg.gamma, cfg.onecycle_warmup))
    return opt, sched


def fingerprint(*parts) -> str:
    """A hash of the settings a checkpoint belongs to: resume only into the same run."""
    text = json.dumps([p if isinstance(p, (dict, list, str, int, float)) else repr(p) for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def array_hash(*arrays, chunk_rows: int = 4096) -> str:
    """SHA-256 of arrays' shapes and bytes (tensors or numpy, memory-mapped ones read in chunks)."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().reshape(a.shape or (1,))
            a = (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy()
        h.update(repr((tuple(a.shape), str(a.dtype))).encode())
        for i in range(0, len(a), chunk_rows):
            # numpy's stubs do not declare the buffer protocol that ndarray implements
            h.update(memoryview(np.ascontiguousarray(a[i:i + chunk_rows])).cast("B"))  # type: ignore[arg-type]
    return h.hexdigest()[:16]


def state_hash(model: nn.Module) -> str:
    """A hash of a model's weights and buffers, by name: the teacher's identity."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(array_hash(value).encode())
    return h.hexdigest()[:16]


def shape_mismatch(model: nn.Module, state: dict) -> list[str]:
    """Names whose shapes differ between ``model`` and a saved state dict (missing keys too)."""
    own = model.state_dict()
    names = sorted(set(own) | set(state))
    return [n for n in names if n not in own or n not in state or tuple(own[n].shape) != tuple(state[n].shape)]


class Trainer:
    """Trains ``model`` with ``objective`` on ``batches``; checkpoints and resumes.

    ``evaluate`` (optional) is called after each epoch with the model in eval mode and returns
    extra metrics (e.g. held-out natural and PGD accuracy). ``callbacks`` get (epoch, metrics).
    ``is_main`` is False on non-zero ranks of a distributed run: they write nothing.
    """

    def __init__(self, model: nn.Module, objective: Objective, batches: TrainBatches,
                 optim: OptimConfig, run: RunConfig, teacher: nn.Module | None = None,
                 evaluate: Callable[[nn.Module], dict] | None = None,
                 callbacks: list[Callback] | None = None, is_main: bool = True,
                 inputs: dict | None = None, log: Callable[[str], None] = print):
        self.device = select_device(run.device)
        self.model = model
        self.plain_model = model      # never wrapped: checkpoints, evaluation, the result
        self.objective = objective
        self.batches = batches
        self.optim_cfg, self.run_cfg = optim, run
        self.teacher = teacher
        if objective.needs_teacher and teacher is None:
            raise InputError(f"method {objective.name!r} needs a teacher model")
        self.evaluate = evaluate
        self.callbacks = list(callbacks or [])
        self.is_main = is_main
        self.log = log if is_main else (lambda *_: None)
        objective.check_run(self.device, run.sync_bn)
        self.fast: FastPath = resolve_fast_path(self.device, run.precision, run.channels_last, run.compile,
                                                run.compile_mode)
        self.iters_per_epoch = min(len(batches), optim.max_batches or len(batches))
        self.optimizer, self.scheduler = build_optimizer(model, optim, self.iters_per_epoch, objective.parameters())
        self.inputs = self.resume_inputs(inputs or {})
        self.fingerprint = fingerprint(self.inputs)
        self.history: list[dict] = []
        self.start_epoch = 0
        self._resumed = False
        self.ckpt_path = Path(run.checkpoint_dir) / "state.pt" if run.checkpoint_dir else None

    # ------------------------------------------------------------- checkpoint
    def resume_inputs(self, given: dict) -> dict[str, str]:
        """One hash per input that decides the result: a checkpoint resumes only when all agree.

        ``given`` adds what only the caller knows (the data's content); the model, method,
        optimiser, numerics, seed and the teacher's weights are taken here.
        """
        run, model = self.run_cfg, self.plain_model
        parts = {
            "model": {"arch": getattr(model, "arch", type(model).__name__),
                      "options": getattr(model, "options", {})},
            "method": {"name": self.objective.name, "settings": asdict(self.objective.config)},
            # grad_clip left out when unset: checkpoints of runs from before the setting still resume
            "optimiser": {k: v for k, v in asdict(self.optim_cfg).items() if not (k == "grad_clip" and v is None)},
            "numerics": {"bf16": self.fast.bf16, "channels_last": self.fast.channels_last,
                         "compile": self.fast.compile, "sync_bn": run.sync_bn,
                         "world_size": self.batches.world_size},
            "seed": run.seed,
            "teacher weights": state_hash(self.teacher) if self.teacher is not None else "none",
            **given,
        }
        return {name: fingerprint(value) for name, value in parts.items()}

    def _set_aside(self, reason: str, old_fingerprint: str) -> None:
        """Keep a checkpoint of another run as ``state.pt.stale-<its fingerprint>`` and say why."""
        assert self.ckpt_path is not None   # only a run with a checkpoint folder finds one to set aside
        stale = self.ckpt_path.with_name(f"{self.ckpt_path.name}.stale-{old_fingerprint}")
        n = 1
        while stale.exists():  # never overwrite one set aside before
            stale = self.ckpt_path.with_name(f"{self.ckpt_path.name}.stale-{old_fingerprint}.{n}")
            n += 1
        if self.is_main:
            os.replace(self.ckpt_path, stale)
        self.log(f"checkpoint {self.ckpt_path} is not of this run ({reason}); starting fresh, "
                 f"the old checkpoint kept as {stale.name}")
        self._drop_old_set_asides()

    def _drop_old_set_asides(self) -> None:
        """Keep the newest ``STALE_KEPT`` set-aside checkpoints; older ones are removed, with one line,
        so that repeated changes of settings do not fill the disk."""
        assert self.ckpt_path is not None
        kept = sorted(self.ckpt_path.parent.glob(f"{self.ckpt_path.name}.stale-*"),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[STALE_KEPT:]:
            if self.is_main:
                old.unlink(missing_ok=True)
            self.log(f"removed the set-aside checkpoint {old.name} (only the newest {STALE_KEPT} are kept)")

    def _remove_unfinished_writes(self) -> None:
        """Temporary files of a checkpoint write that a kill interrupted (robustkd.utils.atomic_path
        renames only complete files over state.pt): removed, with one line."""
        assert self.ckpt_path is not None   # called only for a run with a checkpoint folder
        leftovers = remove_unfinished_writes(self.ckpt_path) if self.is_main else []
        if leftovers:
            self.log(f"removed {len(leftovers)} unfinished checkpoint write(s) of a killed run "
                     f"({', '.join(p.name for p in leftovers)}); {self.ckpt_path.name} itself is complete")

    def _save_state(self, epoch: int) -> None:
        if self.ckpt_path is None or not self.is_main:
            return
        plain = self.plain_model
        state = {
            "fingerprint": self.fingerprint,
            "inputs": json.dumps(self.inputs),
            "epoch": epoch,
            "model": plain.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(self.history),
            "objective": self.objective.state_dict(),   # a method's heads and memory bank
            "fast_path": json.dumps(self.fast.record()),  # which numerics trained it
        }
        atomic_torch_save(state, self.ckpt_path)

    def try_resume(self) -> bool:
        """Load the last checkpoint if it belongs to this run's settings; True if resumed."""
        if self._resumed:
            return True
        if self.ckpt_path is None:
            return False
        self._remove_unfinished_writes()
        if not self.ckpt_path.exists():
            return False
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt, pickled code, not torch
            self._set_aside(f"unreadable: {load_error_reason(exc, self.ckpt_path)}", "unreadable")
            return False
        needed = {"fingerprint", "epoch", "model", "optimizer", "scheduler", "rng_torch", "history"}
        if not isinstance(state, dict) or not needed <= set(state):
            found = f"keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
            self._set_aside(f"not a training checkpoint of this project: expected keys {sorted(needed)}, "
                            f"found {found}", "foreign")
            return False
        old = str(state.get("fingerprint"))
        if old != self.fingerprint:
            saved = json.loads(state.get("inputs") or "{}")
            differ = [k for k in self.inputs if saved.get(k) != self.inputs[k]] if saved else []
            self._set_aside(f"other {', '.join(differ)}" if differ else "other settings", old)
            return False
        mismatch = shape_mismatch(self.plain_model, state["model"])
        if mismatch:
            self._set_aside(f"model shapes differ at {mismatch[:3]}", old)
            return False
        self.plain_model.load_state_dict(state["model"])
        self.objective.load_state_dict(state.get("objective", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.history = json.loads(state["history"])
        self.start_epoch = int(state["epoch"])
        self.log(f"resumed from {self.ckpt_path} after epoch {self.start_epoch}")
        self._resumed = True
        return True

    # ------------------------------------------------------------- training
    def fit(self, stop_after_epoch: int | None = None) -> list[dict]:
        """Train to the configured number of epochs (or stop early after ``stop_after_epoch``,
        used by tests to simulate a kill). Returns the per-epoch history."""
        self.model.to(self.device)
        self.objective.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        for note in self.fast.notes:
            self.log(note)
        self.log(f"fast path on {device_name(self.device)}: {self.fast.describe()}")
        if self.fast.channels_last:
            self.model.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.try_resume()
        # Compiled first, then (under torchrun) DistributedDataParallel around the compiled model:
        # the attacks take DDP off (robustkd.attacks.attack_view) and keep the compiled model, so
        # the whole step runs compiled and only the loss's forwards go through DDP's reducer.
        # Static shapes [choice]: one graph per shape (the training loader drops the last partial
        # batch, robustkd.data.MixedBatchSampler), no dynamic-shape kernels.
        if self.fast.compile:
            mode = self.fast.compile_mode
            self.model = torch.compile(self.model, mode=None if mode == "default" else mode, dynamic=False)
            if mode == "reduce-overhead" and self.batches.world_size > 1:
                self.log("run.compile_mode: reduce-overhead under DDP: graphs whose batch-norm buffers DDP "
                         "broadcasts may run without CUDA graphs (pytorch/pytorch#139207)")
        self.model = wrap_ddp(self.model, self.device, self.run_cfg.sync_bn)
        for epoch in range(self.start_epoch, self.optim_cfg.epochs):
            metrics = self._train_epoch(epoch)
            if self.evaluate is not None and self.is_main:
                self.model.eval()
                metrics.update(self.evaluate(self.plain_model))
            self.history.append(metrics)
            self._save_state(epoch + 1)
            for cb in self.callbacks:
                if self.is_main:
                    cb(epoch + 1, metrics)
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in metrics.items()))
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        self.model = self.plain_model
        self.model.eval()
        return self.history

    def _non_finite_message(self, epoch: int, index: int, loss, parts: dict) -> str:
        kept = "no checkpoint is kept (checkpointing is off)"
        if self.ckpt_path is not None:
            kept = (f"the last good checkpoint {self.ckpt_path} (after epoch {epoch}) is kept, a rerun resumes "
                    f"from it" if epoch > 0 and self.ckpt_path.exists() else "no epoch had finished: no checkpoint")
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
        value = f"{float(loss.detach())} " if loss is not None else "NaN or inf "
        detail = f" ({values})" if values else ""
        return (f"the training loss is {value}at epoch {epoch + 1}, batch {index + 1} of "
                f"{len(self.batches)}{detail}; training stopped, {kept}")

    def _train_epoch(self, epoch: int) -> dict:
        seed = self.run_cfg.seed
        torch.manual_seed(seed * 1_000_003 + epoch)
        attack_gen = make_generator(seed * 7_919 + epoch, self.device)
        self.model.train()
        # Metrics are summed on the device and read once per epoch: no host synchronisation per step.
        sums: dict[str, torch.Tensor | float] = {}
        count, images = 0, 0
        start = time.perf_counter()
        amp = lambda: autocast(self.device, self.fast.bf16)  # noqa: E731
        check_every = 1 if self.device.type != "cuda" else max(1, self.run_cfg.nonfinite_check_every)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)   # first non-finite batch
        graphs = self.fast.compile and self.fast.compile_mode == "reduce-overhead" and self.device.type == "cuda"
        batches = itertools.islice(self.batches.epoch(seed, epoch), self.iters_per_epoch)
        for batch in progress(batches, total=self.iters_per_epoch, desc=f"epoch {epoch + 1}",
                              every_s=self.run_cfg.progress_every_s):
            if graphs:   # CUDA graph trees: one generation per training step
                torch.compiler.cudagraph_mark_step_begin()
            if self.fast.channels_last:
                batch.x = batch.x.contiguous(memory_format=torch.channels_last)
                if batch.x_pair is not None:
                    batch.x_pair = batch.x_pair.contiguous(memory_format=torch.channels_last)
            loss, parts = self.objective(self.model, self.teacher, batch, epoch=epoch,
                                         generator=attack_gen, autocast=amp,
                                         epoch_float=epoch + (count + 1) / self.iters_per_epoch)
            bad = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, count), first_bad)
            if check_every == 1 or (count + 1) % check_every == 0:
                self._check_finite(epoch, first_bad, loss if check_every == 1 else None, parts)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(self.objective.parameters())   # DDP averages only the model's
            if self.optim_cfg.grad_clip is not None:   # AT-PRM: clip_grad_norm_(model.parameters(), 1.0)
                torch.nn.utils.clip_grad_norm_(self.plain_model.parameters(), self.optim_cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            sums["loss"] = sums.get("loss", 0.0) + loss.detach()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else float(v))
            count += 1
            images += len(batch.x)
        self._check_finite(epoch, first_bad, None, {})
        elapsed = time.perf_counter() - start
        out: dict[str, float] = {"epoch": epoch + 1}
        # mean over ranks of each rank's mean (equal shards: the global batch's mean)
        out.update(average_scalars({k: float(v) / max(count, 1) for k, v in sums.items()}))
        world = self.batches.world_size
        out.update({"lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
                    "images_per_s": images * world / max(elapsed, 1e-9)})
        return out

    def _check_finite(self, epoch: int, first_bad: torch.Tensor, loss, parts: dict) -> None:
        """Stop with the epoch and batch named when a loss was NaN or inf (one host read).

        On GPUs the check reads the device flag every ``run.nonfinite_check_every`` steps (a host
        synchronisation per step would cost throughput); the batch named is still the first bad one.
        """
        index = int(first_bad)
        if index >= 0:
            raise NonFiniteLoss(self._non_finite_message(epoch, index, loss, parts))
