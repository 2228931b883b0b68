"""Stage train_teacher: adversarially train the teacher (TRADES; PGD-AT as an option), or take
a given checkpoint with ``teacher.source: checkpoint``. Resumes after a kill."""

from __future__ import annotations

import torch

from robustkd.engine import state_hash
from robustkd.errors import InputError
from robustkd.methods import create_objective
from robustkd.models import create_model, load_checkpoint, save_checkpoint

from services.common import (CHECKPOINTS, METRICS, MODELS, PREPARED, cli, load_imageset, parser, read_params,
                     setup_distributed, write_csv, write_json)
from services.params import dataset_key
from services.training import run_training


def given_teacher(path: str, cfg, classes: list[str]):
    """``teacher.checkpoint``, checked before anything is written: the architecture and options of
    ``teacher.model``, one output per class of the prepared data, [0, 1] pixel input (the models'
    convention: normalisation inside, so mean and std are fractions of a pixel's range)."""
    model = load_checkpoint(cfg.checkpoint, expect_arch=cfg.model.arch)
    where = f"{path}: teacher.checkpoint {cfg.checkpoint}"
    opts = dict(model.options)
    given = {k: v for k, v in opts.items() if k not in ("num_classes", "mean", "std")}
    if given != dict(cfg.model.options):
        raise InputError(f"{where}: model options {given}, teacher.model.options says {cfg.model.options}")
    if opts["num_classes"] != len(classes):
        raise InputError(f"{where}: {opts['num_classes']} outputs, the prepared data has {len(classes)} classes")
    stats = list(opts["mean"]) + list(opts["std"])
    if not all(0 < float(v) <= 1 for v in stats):
        raise InputError(f"{where}: expected [0, 1] pixel input (normalisation mean and std in (0, 1]), "
                         f"found mean {opts['mean']} std {opts['std']}")
    return model


def main(args) -> None:
    params = read_params(args)
    cfg = params.teacher
    dist_info, device = setup_distributed(params)
    MODELS.mkdir(exist_ok=True)
    if cfg.source == "checkpoint":
        if not dist_info.is_main:
            return
        model = given_teacher(args.params, cfg, load_imageset(PREPARED / "train.npz").classes)
        save_checkpoint(model, MODELS / "teacher.pt", source=cfg.checkpoint)
        write_json({}, METRICS / "teacher_train.json")  # nothing trained: no figures
        write_json({"source": "checkpoint", "checkpoint": cfg.checkpoint, "model": model.arch,
                    "teacher weights": state_hash(model)}, METRICS / "teacher_info.json")
        write_csv([], METRICS / "teacher_history.csv")
        print(f"teacher taken from {cfg.checkpoint} ({model.arch})")
        return
    train = load_imageset(PREPARED / "train.npz")
    heldout = load_imageset(PREPARED / "heldout.npz")
    args.tracker.log_imageset(train, PREPARED / "train.npz", "train", "training")
    args.tracker.log_imageset(heldout, PREPARED / "heldout.npz", "heldout", "validation")
    torch.manual_seed(params.run.seed)  # run.seed fixes the initial weights too
    model = create_model(cfg.model.arch, train.num_classes, **cfg.model.options)
    objective = create_objective(cfg.method, cfg.settings, dataset=dataset_key(train.num_classes),
                                 where=f"{args.params}:teacher.settings")
    history = run_training(model, objective, cfg.optim, params, train, heldout, device,
                           CHECKPOINTS / "teacher", METRICS / "teacher_history.csv",
                           METRICS / "teacher_train.json", monitor_steps=cfg.monitor_pgd_steps,
                           extra_callbacks=[args.tracker.epoch_callback],
                           rank=dist_info.rank, world_size=dist_info.world_size)
    if not dist_info.is_main:
        return
    save_checkpoint(model, MODELS / "teacher.pt", method=cfg.method, epochs=len(history),
                    dataset=params.data.source)
    for path in (METRICS / "teacher_train.json", METRICS / "teacher_history.csv", MODELS / "teacher.pt"):
        args.tracker.log_artifact(path)
    print(f"teacher {cfg.model.arch} trained with {cfg.method}: {history[-1]}")


def build_parser():
    return parser(__doc__)


run = cli(main, build_parser, "train_teacher", ("teacher", "data", "run"))

if __name__ == "__main__":
    run()
