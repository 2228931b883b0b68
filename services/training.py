"""What train_teacher and distill share: building the trainer from params and running it
with the per-epoch history, held-out monitoring and resume."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from robustkd.data import GeneratedPool, ImageSet, TrainBatches
from robustkd.engine import OptimConfig, RunConfig, Trainer, array_hash
from robustkd.methods import Objective

from . import tracking
from .common import HistoryWriter, heldout_monitor, write_json
from .params import Params


def info_path(metrics_json: Path) -> Path:
    """metrics/student_train.json -> metrics/student_info.json (not a DVC metric: text)."""
    return metrics_json.with_name(metrics_json.name.replace("_train.json", "") + "_info.json")


def data_hash(train: ImageSet, heldout: ImageSet | None, generated: GeneratedPool | None,
              fraction: float, partner_labels=None) -> dict:
    """The content of everything a run reads: prepared arrays, generated arrays, their mix."""
    sets = {"train": train, "heldout": heldout}
    out = {name: [array_hash(s.images, s.labels), s.classes] for name, s in sets.items() if s is not None}
    if generated is not None and len(generated):
        out["generated"] = [array_hash(generated.images, generated.labels), fraction]
    if partner_labels is not None:
        out["partner_labels"] = array_hash(torch.as_tensor(partner_labels))
    return out


def run_training(model, objective: Objective, optim: OptimConfig, params: Params, train: ImageSet,
                 heldout: ImageSet | None, device: torch.device, checkpoint_dir: Path, history_csv: Path,
                 metrics_json: Path, teacher=None, generated: GeneratedPool | None = None,
                 fraction: float = 0.0, partner_labels=None, monitor_steps: int = 10,
                 extra_callbacks=(), rank: int = 0, world_size: int = 1, init: dict | None = None) -> list[dict]:
    """``init``: how the model's weights were initialised (the teacher's ``teacher.pretrained``),
    recorded in the info file and MLflow; a pretrained file's hash joins the resume inputs."""
    eps = getattr(objective.config, "eps", 8 / 255)
    step = getattr(objective.config, "step_size", 2 / 255)
    batches = TrainBatches(train, optim.batch_size, device, generated=generated, fraction=fraction,
                           with_partners=objective.needs_partners, partner_labels=partner_labels,
                           rank=rank, world_size=world_size)
    history = HistoryWriter(history_csv, metrics_json)  # numbers only: DVC compares them
    run_cfg = RunConfig(seed=params.run.seed, device=str(device), precision=params.run.precision,
                        channels_last=params.run.channels_last, compile=params.run.compile,
                        compile_mode=params.run.compile_mode, checkpoint_dir=str(checkpoint_dir),
                        sync_bn=params.run.sync_bn)
    trainer = Trainer(model, objective, batches, optim, run_cfg, teacher=teacher,
                      evaluate=heldout_monitor(heldout, device, monitor_steps, eps, step, params.run.seed),
                      callbacks=[history, *extra_callbacks], is_main=rank == 0,
                      inputs={"data": data_hash(train, heldout, generated, fraction, partner_labels),
                              **({"init": init["pretrained_hash"]} if init and "pretrained_hash" in init else {})})
    if rank == 0:  # the text of the run beside its metrics, and the hashes resume compares
        write_json({"method": objective.name, "model": getattr(model, "arch", ""), **(init or {}),
                    "inputs": trainer.inputs,
                    "fast_path": trainer.fast.record(), "fast_path_notes": trainer.fast.notes},
                   info_path(metrics_json))
        tracker = tracking.current()
        tracker.log_params({"method": {"name": objective.name, **asdict(objective.config)},
                            **({"init": init} if init else {})})
        tracker.set_tags({f"input.{k.replace(' ', '_')}": v for k, v in trainer.inputs.items()})
    if trainer.try_resume():
        history.load_previous(trainer.history)
        for row in trainer.history:  # the resumed run's tracker gets the epochs trained before the kill
            for callback in extra_callbacks if rank == 0 else ():
                callback(int(row["epoch"]), row)
    result = trainer.fit()
    if rank == 0:
        history.flush()  # also when every epoch was done before a kill: DVC removed the outputs
    return result
