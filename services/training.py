"""What train_teacher and distill share: building the trainer from params and running it
with the per-epoch history, held-out monitoring, the best checkpoint beside the last, and resume."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from robustkd.attacks import ALPHA_DEFAULT, EPS_DEFAULT
from robustkd.checkpoints import save_checkpoint
from robustkd.data import GeneratedPool, ImageSet, TrainBatches
from robustkd.engine import OptimConfig, RunConfig, Trainer, array_hash
from robustkd.methods import Objective
from robustkd.utils import atomic_path

from . import tracking
from .common import HistoryWriter, heldout_monitor, write_json
from .params import Params


def info_path(metrics_json: Path) -> Path:
    """metrics/student_train.json -> metrics/student_info.json (not a DVC metric: text)."""
    return metrics_json.with_name(metrics_json.name.replace("_train.json", "") + "_info.json")


def best_path(model_path: Path) -> Path:
    """models/student.pt -> models/student_best.pt: the best held-out robust checkpoint beside the last."""
    return model_path.with_name(f"{model_path.stem}_best{model_path.suffix}")


def selected_path(model_path: Path, select: str) -> Path:
    """The checkpoint a selection setting (``teacher.select``, ``distill.select``) names."""
    return best_path(model_path) if select == "best" else model_path


class BestKeeper:
    """Per-epoch callback: the checkpoint of the best held-out robust accuracy so far.

    Adversarial training overfits robustly: the test robust accuracy peaks soon after the first
    learning-rate decay and then falls (Rice, Wong, Kolter, "Overfitting in adversarially robust
    deep learning", ICML 2020, https://arxiv.org/abs/2002.11569). IAD's and AdaAD's official code
    keep the checkpoint with the best robust accuracy beside the last one, replacing it only on a
    strict improvement: ZFancy/IAD ``IAD-I.py`` L251-259 (commit a8091a8c7552cef43d8f3f28085426cb786ce9d3,
    ``if robust_val > best_acc``: ``bestpoint.pth.tar``, test PGD-10) and boyellow/AdaAD ``main.py``
    L479-493 (commit 9e5c6e5ff73052af196065439517562d37eff6e6, ``if Test_PGD10_acc >
    best_Test_PGD10_acc``: ``best_PGD10_acc_model.pth``, and the last epoch's file, L495-506). Both
    select on the test set; here the selection reads the held-out slice (``data.heldout_per_class``),
    never the test images the evaluation reports. Ties keep the earlier epoch, as there.

    After each epoch's monitor (``heldout_pgd<steps>`` in the epoch's metrics) a strict improvement
    writes ``store`` (in the persisted checkpoint folder, with the run's resume fingerprint) and
    ``path`` (``models/<name>_best.pt``), both atomically and in the format of the last checkpoint
    (``robustkd.checkpoints.save_checkpoint``), with ``best_epoch`` and ``best_heldout_pgd`` in its
    metadata. :meth:`resume` takes the best of the same run (same fingerprint) back after a kill.
    """

    def __init__(self, model, path: Path, store: Path, key: str | None, fingerprint: str,
                 meta: dict | None = None, log=print):
        self.model, self.path, self.store, self.key = model, Path(path), Path(store), key
        self.fingerprint, self.meta, self.log = fingerprint, dict(meta or {}), log
        self.best: dict | None = None     # {"epoch": 1-based, "accuracy": percent}

    def __call__(self, epoch: int, metrics: dict) -> None:
        accuracy = metrics.get(self.key) if self.key else None
        if accuracy is None:
            return
        if self.best is None or float(accuracy) > self.best["accuracy"]:
            self.best = {"epoch": int(epoch), "accuracy": float(accuracy)}
            self._save()

    def _save(self) -> None:
        assert self.best is not None   # called after an improvement
        save_checkpoint(self.model, self.store, **self.meta, fingerprint=self.fingerprint,
                        best_epoch=self.best["epoch"], best_heldout_pgd=self.best["accuracy"],
                        best_metric=self.key, selection="best held-out robust accuracy")
        self._publish()

    def _publish(self) -> None:
        with atomic_path(self.path) as tmp:   # a copy of the store: the same bytes, renamed over the old file
            shutil.copyfile(self.store, tmp)

    def resume(self, resumed: bool, history: list[dict]) -> None:
        """After ``Trainer.try_resume``: the stored best of this run (same fingerprint) is kept; a
        fresh run drops a best of another run. An epoch of ``history`` better than the stored best
        (a kill between the last checkpoint's write and the best's) is the resumed epoch itself,
        whose weights are those just loaded: saved as the best now."""
        stored = _stored_best(self.store)
        if resumed and stored is not None and stored.get("fingerprint") == self.fingerprint \
                and stored.get("best_metric") != self.key:   # the monitor's steps are not in the fingerprint
            self.log(f"best checkpoint: {self.store} was chosen by {stored.get('best_metric')}, this run's monitor "
                     f"reports {self.key}; dropped, the best is chosen again from the epochs that report it")
            stored = None
        if not resumed or stored is None or stored.get("fingerprint") != self.fingerprint:
            self.store.unlink(missing_ok=True)
            stored = None
        if stored is not None:
            self.best = {"epoch": int(stored["best_epoch"]), "accuracy": float(stored["best_heldout_pgd"])}
        if not resumed or not self.key:
            return
        rows = [(int(r["epoch"]) if "epoch" in r else i + 1, float(r[self.key]))
                for i, r in enumerate(history) if r.get(self.key) is not None]
        if not rows:
            return
        epoch, accuracy = max(rows, key=lambda r: (r[1], -r[0]))
        if self.best is None or accuracy > self.best["accuracy"]:
            if epoch == len(history):
                self.best = {"epoch": epoch, "accuracy": accuracy}
                self._save()
                self.log(f"best checkpoint: epoch {epoch} (held-out {self.key} {accuracy:.2f}) saved after the resume")
            else:
                self.log(f"best checkpoint: epoch {epoch} of the history is better than the stored best "
                         f"({self.best}) but its weights are gone; the stored best is kept")
        if self.best is not None and self.store.is_file():
            self._publish()   # DVC removed models/ before the rerun: the best of this run again

    def finish(self, last_epoch: int) -> dict:
        """After training: ``path`` holds the best; with the monitor off (no held-out robust
        accuracy), the last weights, saying so. Returns what the info and metrics record."""
        if self.best is not None and self.store.is_file():
            self._publish()
            return {"best_epoch": self.best["epoch"], "best_heldout_pgd": self.best["accuracy"],
                    "best_metric": self.key, "best_file": str(self.path)}
        save_checkpoint(self.model, self.path, **self.meta, fingerprint=self.fingerprint, best_epoch=last_epoch,
                        selection="last: the held-out PGD monitor is off, there is no best")
        self.log(f"best checkpoint: the held-out PGD monitor is off; {self.path} holds the last epoch's weights")
        return {"best_epoch": last_epoch, "best_metric": "none (monitor off)", "best_file": str(self.path)}


def _stored_best(path: Path) -> dict | None:
    """The metadata of a stored best checkpoint; None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
    except Exception:  # noqa: BLE001 - a truncated or foreign file: no best to resume
        return None
    return meta if {"fingerprint", "best_epoch", "best_heldout_pgd"} <= set(meta) else None


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


def resolved_fast_path(record: dict) -> dict:
    """The run.* settings as the trainer resolved them (``auto`` -> what ran on this device): the
    values MLflow records under run.precision, run.channels_last, run.compile, run.compile_mode."""
    return {"precision": "bf16" if record["bf16"] else "fp32", "channels_last": record["channels_last"],
            "compile": record["compile"], "compile_mode": record["compile_mode"]}


def training_config(objective: Objective, optim: OptimConfig, fast_record: dict, inputs: dict, data: dict,
                    init: dict | None = None, optim_how: str | None = None) -> dict:
    """What a training stage adds to its resolved configuration (services.tracking.stage_config),
    all of it already computed by the run: the method's settings as run (``method.*``: numbers, the
    one method), the optimiser as resolved (``optimiser.*``; ``optimiser.how``: the sentence saying
    how it was set, distill's ``resolve_optim``), the fast path as taken on this machine
    (``run.precision``, ``run.channels_last``, ``run.compile``, ``run.compile_mode``), the resume
    inputs (``inputs.*``: one hash each of model, method, optimiser, numerics, seed, teacher
    weights, data) and the content hash of each array set read (``data_hash.*``: :func:`data_hash`;
    not ``data.*``, the params section)."""
    data_ids = {name: value[0] if isinstance(value, list) else value for name, value in data.items()}
    if isinstance(data.get("generated"), list):
        data_ids["generated_fraction"] = data["generated"][1]
    return {"method": {"name": objective.name, **asdict(objective.config)},
            "optimiser": {**asdict(optim), **({"how": optim_how} if optim_how else {})},
            "run": resolved_fast_path(fast_record),
            "inputs": {k.replace(" ", "_"): v for k, v in inputs.items()},
            "data_hash": data_ids,
            **({"init": init} if init else {})}


def run_training(model, objective: Objective, optim: OptimConfig, params: Params, train: ImageSet,
                 heldout: ImageSet | None, device: torch.device, checkpoint_dir: Path, history_csv: Path,
                 metrics_json: Path, teacher=None, generated: GeneratedPool | None = None,
                 fraction: float = 0.0, partner_labels=None, monitor_steps: int = 10,
                 extra_callbacks=(), rank: int = 0, world_size: int = 1, init: dict | None = None,
                 best_file: Path | None = None, best_meta: dict | None = None,
                 optim_how: str | None = None) -> list[dict]:
    """``init``: how the model's weights were initialised (the teacher's ``teacher.pretrained``),
    recorded in the info file and MLflow; a pretrained file's hash joins the resume inputs.
    ``best_file`` (``models/<name>_best.pt``): the best held-out robust checkpoint is kept there
    (:class:`BestKeeper`, its resumable copy ``best.pt`` in ``checkpoint_dir``), with ``best_meta``
    as the last checkpoint's metadata; its epoch and accuracy go to the info and metrics files.
    ``optim_how``: how the optimiser was set (distill's ``resolve_optim``), in the configuration."""
    eps = getattr(objective.config, "eps", EPS_DEFAULT)        # the held-out monitor's attack
    step = getattr(objective.config, "step_size", ALPHA_DEFAULT)
    batches = TrainBatches(train, optim.batch_size, device, generated=generated, fraction=fraction,
                           with_partners=objective.needs_partners, partner_labels=partner_labels,
                           rank=rank, world_size=world_size, **objective.partner_options)
    history = HistoryWriter(history_csv, metrics_json)  # numbers only: DVC compares them
    data = data_hash(train, heldout, generated, fraction, partner_labels)
    run_cfg = RunConfig(seed=params.run.seed, device=str(device), precision=params.run.precision,
                        channels_last=params.run.channels_last, compile=params.run.compile,
                        compile_mode=params.run.compile_mode, checkpoint_dir=str(checkpoint_dir),
                        sync_bn=params.run.sync_bn)
    trainer = Trainer(model, objective, batches, optim, run_cfg, teacher=teacher,
                      evaluate=heldout_monitor(heldout, device, monitor_steps, eps, step, params.run.seed),
                      callbacks=[history, *extra_callbacks], is_main=rank == 0,
                      inputs={"data": data,
                              **({"init": init["pretrained_hash"]} if init and "pretrained_hash" in init else {})})
    info = {"method": objective.name, "model": getattr(model, "arch", ""), **(init or {}),
            "inputs": trainer.inputs, "fast_path": trainer.fast.record(), "fast_path_notes": trainer.fast.notes}
    keeper = None
    if rank == 0 and best_file is not None:
        heldout_on = heldout is not None and len(heldout) > 0 and monitor_steps > 0
        keeper = BestKeeper(model, best_file, Path(checkpoint_dir) / "best.pt",
                            f"heldout_pgd{monitor_steps}" if heldout_on else None, trainer.fingerprint,
                            best_meta)
        trainer.callbacks.append(keeper)   # after the history: the epoch's metrics are written first
    if rank == 0:  # the text of the run beside its metrics, and the hashes resume compares
        write_json(info, info_path(metrics_json))
        tracker = tracking.current()
        tracker.log_params(training_config(objective, optim, trainer.fast.record(), trainer.inputs, data,
                                           init, optim_how))
        tracker.set_tags({f"input.{k.replace(' ', '_')}": v for k, v in trainer.inputs.items()})
    resumed = trainer.try_resume()
    if resumed:
        history.load_previous(trainer.history)
        for row in trainer.history:  # the resumed run's tracker gets the epochs trained before the kill
            for callback in extra_callbacks if rank == 0 else ():
                callback(int(row["epoch"]), row)
    if keeper is not None:
        keeper.resume(resumed, trainer.history)
    result = trainer.fit()
    if rank == 0:
        if keeper is not None:   # the best's epoch and accuracy: in the metrics (numbers) and the info
            best = keeper.finish(len(result))
            if "best_heldout_pgd" in best:   # the monitor ran: a best of its own
                history.extra.update({k: v for k, v in best.items() if isinstance(v, (int, float))})
            write_json({**info, "best_checkpoint": best}, info_path(metrics_json))
            tracking.current().log_metrics({k: v for k, v in best.items() if isinstance(v, (int, float))})
        history.flush()  # also when every epoch was done before a kill: DVC removed the outputs
    return result
