"""Stage train_teacher: adversarially train the teacher (TRADES; PGD-AT as an option), or take
a given checkpoint with ``teacher.source: checkpoint``. Resumes after a kill."""

from __future__ import annotations

from robustkd.methods import create_objective
from robustkd.models import create_model, load_checkpoint, save_checkpoint

from .common import (CHECKPOINTS, METRICS, MODELS, PREPARED, cli, load_imageset, parser, read_params,
                     setup_distributed, write_csv, write_json)
from .params import dataset_key
from .training import run_training


def main(args) -> None:
    params = read_params(args)
    cfg = params.teacher
    dist_info, device = setup_distributed(params)
    MODELS.mkdir(exist_ok=True)
    if cfg.source == "checkpoint":
        if not dist_info.is_main:
            return
        model = load_checkpoint(cfg.checkpoint)  # validates the file before anything is written
        save_checkpoint(model, MODELS / "teacher.pt", source=cfg.checkpoint)
        write_json({"source": "checkpoint", "checkpoint": cfg.checkpoint, "arch": model.arch},
                   METRICS / "teacher_train.json")
        write_csv([], METRICS / "teacher_history.csv")
        print(f"teacher taken from {cfg.checkpoint} ({model.arch})")
        return
    train = load_imageset(PREPARED / "train.npz")
    heldout = load_imageset(PREPARED / "heldout.npz")
    model = create_model(cfg.model.arch, train.num_classes, **cfg.model.options)
    objective = create_objective(cfg.method, cfg.settings, dataset=dataset_key(train.num_classes),
                                 where=f"{args.params}:teacher.settings")
    history = run_training(model, objective, cfg.optim, params, train, heldout, device,
                           CHECKPOINTS / "teacher", METRICS / "teacher_history.csv",
                           METRICS / "teacher_train.json", monitor_steps=params.distill.monitor_pgd_steps,
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
