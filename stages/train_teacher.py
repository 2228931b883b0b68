"""Stage train_teacher: adversarially train the teacher (TRADES; PGD-AT, AT-PRM for ViTs as options), or
take a given checkpoint (``teacher.source: checkpoint``: a robustkd checkpoint, the TRADES release
``model_cifar_wrn.pt`` or, for a ViT teacher, an AT-PRM ``train_cifar.py`` checkpoint; the formats:
robustkd/checkpoints.py) or a released teacher of the model zoo (``teacher.source: zoo``,
robustkd/teachers.py). A ViT teacher trained here starts from ``teacher.pretrained`` (local
ImageNet weights, adapted) or from scratch; the run says which. Resumes after a kill.

    python -m stages.train_teacher --download-only   # fetch the zoo teacher's file (needs a network)
"""

from __future__ import annotations

import torch

from robustkd.checkpoints import load_given_checkpoint, load_imagenet_weights, save_checkpoint
from robustkd.engine import state_hash
from robustkd.errors import InputError
from robustkd.methods import create_objective
from robustkd.models import create_model
from robustkd.models.vit import is_vit
from robustkd.teachers import download, load_zoo_teacher, zoo_entry

from services.common import (CHECKPOINTS, METRICS, MODELS, PREPARED, cli, load_imageset, parser, read_params,
                     setup_distributed, write_csv, write_json)
from services.params import dataset_key
from services.training import best_path, run_training


def load_given(cfg):
    """(model, where, description) of ``teacher.source: checkpoint`` or ``zoo``."""
    if cfg.source == "zoo":
        entry = zoo_entry(cfg.zoo.name)
        model = load_zoo_teacher(entry, cfg.zoo.dir, allow_download=cfg.zoo.download)
        info = {"zoo name": entry.name, "file": str(entry.path(cfg.zoo.dir)), "dataset": entry.dataset,
                "published clean": entry.clean, "published autoattack": entry.autoattack,
                "published eps": entry.eps, "figures from": entry.source}
        return model, f"teacher.zoo {entry.name} ({entry.path(cfg.zoo.dir)})", info
    where = f"teacher.checkpoint {cfg.checkpoint}"
    model, info = load_given_checkpoint(cfg.checkpoint, cfg.model.arch, dict(cfg.model.options))
    return model, where, info


def given_teacher(path: str, cfg, classes: list[str]):
    """The given teacher (``teacher.checkpoint`` or ``teacher.zoo``), checked before anything is
    written: the architecture and options of ``teacher.model``, one output per class of the
    prepared data, [0, 1] pixel input (the models' convention: normalisation inside, so mean and
    std are fractions of a pixel's range; a model trained on raw [0, 1] pixels has mean 0, std 1)."""
    return _given_teacher(path, cfg, classes)[0]


def _given_teacher(path: str, cfg, classes: list[str]):
    model, where, info = load_given(cfg)
    where = f"{path}: {where}"
    opts = dict(model.options)
    given = {k: v for k, v in opts.items() if k not in ("num_classes", "mean", "std")}
    if given != dict(cfg.model.options):
        raise InputError(f"{where}: model options {given}, teacher.model.options says {cfg.model.options}")
    if opts["num_classes"] != len(classes):
        raise InputError(f"{where}: {opts['num_classes']} outputs, the prepared data has {len(classes)} classes")
    if not (all(0 <= float(v) <= 1 for v in opts["mean"]) and all(0 < float(v) <= 1 for v in opts["std"])):
        raise InputError(f"{where}: expected [0, 1] pixel input (normalisation mean in [0, 1], std in (0, 1]), "
                         f"found mean {opts['mean']} std {opts['std']}")
    return model, info


def initialise(model, cfg) -> dict:
    """The initial weights of a teacher trained here: ``teacher.pretrained`` (local ImageNet
    weights, ViTs only) or from scratch (``run.seed``). Returns what the run records about it."""
    if cfg.pretrained:
        return load_imagenet_weights(model, cfg.pretrained)
    if is_vit(model.arch):
        return {"init": "from scratch (teacher.pretrained empty; AT-PRM starts from ImageNet weights, "
                        "so expect lower accuracy)"}
    return {"init": "from scratch"}


def main(args) -> None:
    params = read_params(args)
    cfg = params.teacher
    if args.download_only:
        args.config_path = None   # not a pipeline run: the configuration of the last one stays
        entry = zoo_entry(cfg.zoo.name)
        print(f"zoo teacher {entry.name}: {download(entry, cfg.zoo.dir)}")
        return
    dist_info, device = setup_distributed(params)
    MODELS.mkdir(exist_ok=True)
    if cfg.source in ("checkpoint", "zoo"):
        if not dist_info.is_main:
            return
        model, info = _given_teacher(args.params, cfg, load_imageset(PREPARED / "train.npz").classes)
        given = info.get("file", cfg.checkpoint)
        save_checkpoint(model, MODELS / "teacher.pt", source=given, **{k.replace(" ", "_"): v for k, v in info.items()})
        save_checkpoint(model, best_path(MODELS / "teacher.pt"), source=given,  # a declared output: the same weights
                        selection="last: a given teacher, nothing trained here",
                        **{k.replace(" ", "_"): v for k, v in info.items()})
        write_json({}, METRICS / "teacher_train.json")  # nothing trained: no figures
        write_json({"source": cfg.source, "checkpoint": given, "model": model.arch,
                    "normalisation": {"mean": model.options["mean"], "std": model.options["std"]},
                    **info, "teacher weights": state_hash(model)}, METRICS / "teacher_info.json")
        write_csv([], METRICS / "teacher_history.csv")
        args.tracker.log_params({"inputs": {"teacher_weights": state_hash(model)}})
        (CHECKPOINTS / "teacher").mkdir(parents=True, exist_ok=True)  # a declared output: nothing to resume
        print(f"teacher taken from {given} ({model.arch}, {info})")
        return
    train = load_imageset(PREPARED / "train.npz")
    heldout = load_imageset(PREPARED / "heldout.npz")
    args.tracker.log_imageset(train, PREPARED / "train.npz", "train", "training")
    args.tracker.log_imageset(heldout, PREPARED / "heldout.npz", "heldout", "validation")
    torch.manual_seed(params.run.seed)  # run.seed fixes the initial weights too
    model = create_model(cfg.model.arch, train.num_classes, **cfg.model.options)
    init = initialise(model, cfg)
    print(f"teacher {cfg.model.arch}: {init['init']}")
    objective = create_objective(cfg.method, cfg.settings, dataset=dataset_key(train.num_classes),
                                 where=f"{args.params}:teacher.settings")
    history = run_training(model, objective, cfg.optim, params, train, heldout, device,
                           CHECKPOINTS / "teacher", METRICS / "teacher_history.csv",
                           METRICS / "teacher_train.json", monitor_steps=cfg.monitor_pgd_steps,
                           extra_callbacks=[args.tracker.epoch_callback],
                           rank=dist_info.rank, world_size=dist_info.world_size, init=init,
                           best_file=best_path(MODELS / "teacher.pt"),
                           best_meta={"method": cfg.method, "dataset": params.data.source, **init})
    if not dist_info.is_main:
        return
    save_checkpoint(model, MODELS / "teacher.pt", method=cfg.method, epochs=len(history),
                    dataset=params.data.source, **init)
    for path in (METRICS / "teacher_train.json", METRICS / "teacher_history.csv", MODELS / "teacher.pt",
                 best_path(MODELS / "teacher.pt")):
        args.tracker.log_artifact(path)
    print(f"teacher {cfg.model.arch} trained with {cfg.method}: {history[-1]}")


def build_parser():
    p = parser(__doc__)
    p.add_argument("--download-only", action="store_true",
                   help="only download teacher.zoo's file into teacher.zoo.dir (before the first dvc repro)")
    return p


run = cli(main, build_parser, "train_teacher", ("teacher", "data", "run"),
          config=METRICS / "teacher_config.json")

if __name__ == "__main__":
    run()
