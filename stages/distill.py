"""Stage distill: train the student from the teacher with a robust distillation method
(any student method of the registry ``robustkd.methods``: darwin, darwin_lf, ard, iad, rslad,
adaad, crdnd, gacd; natural_kd as the non-adversarial reference),
mixing real and generated images at ``ddpm.fraction`` per batch. Resumes after a kill."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robustkd.data import GeneratedPool, to_float
from robustkd.methods import DataInfo, create_objective
from robustkd.checkpoints import load_checkpoint, save_checkpoint
from robustkd.models import create_model

from services.common import (CHECKPOINTS, GENERATED, METRICS, MODELS, PREPARED, cli, load_imageset, parser,
                     read_params, setup_distributed)
from services.params import dataset_key, method_settings, resolve_optim
from services.training import best_path, run_training, selected_path


def load_generated() -> GeneratedPool | None:
    path = GENERATED / "images.npy"
    if not path.exists():
        return None
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    labels = np.load(GENERATED / "labels.npy", allow_pickle=False)
    return GeneratedPool(images, labels) if len(labels) else None


def teacher_predictions(teacher, images_u8: torch.Tensor, device, batch: int = 512) -> torch.Tensor:
    """The teacher's argmax on clean images: DARWIN-LF's labels for partner sampling."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            out.append(teacher(to_float(images_u8[i:i + batch]).to(device)).argmax(1).cpu())
    return torch.cat(out)


def main(args) -> None:
    params = read_params(args)
    method = params.distill.method   # --method and --variant are applied by cli (recorded as run)
    out_dir = Path(args.out_dir) if args.out_dir else None
    dist_info, device = setup_distributed(params)
    cfg = params.distill
    train = load_imageset(PREPARED / "train.npz")
    heldout = load_imageset(PREPARED / "heldout.npz")
    if dist_info.is_main:
        args.tracker.log_imageset(train, PREPARED / "train.npz", "train", "training")
        args.tracker.log_imageset(heldout, PREPARED / "heldout.npz", "heldout", "validation")
    teacher = load_checkpoint(selected_path(MODELS / "teacher.pt", params.teacher.select)).to(device)
    generated = load_generated()
    torch.manual_seed(params.run.seed)
    student = create_model(cfg.student.arch, train.num_classes, **cfg.student.options)
    pool_labels = torch.cat([train.labels] + ([generated.labels] if generated is not None else []))
    objective = create_objective(method, method_settings(params, method), dataset=dataset_key(train.num_classes),
                                 where=f"{args.params}:distill.settings.{method}",
                                 data=DataInfo(train.num_classes, pool_labels, student.feature_dim,
                                               teacher.feature_dim))
    optim, optim_how = resolve_optim(params, method, train.num_classes, args.schedule)
    if dist_info.is_main:
        print(f"{method}: optimiser {optim_how}")
    partner_labels = None
    if objective.needs_partners and getattr(objective.config, "label_free", False):
        partner_labels = teacher_predictions(teacher, train.images, device)
    name = args.name or ("student" if out_dir is None else method)
    model_path = (out_dir or MODELS) / f"{name}.pt"
    metrics_dir = out_dir or METRICS
    args.config_path = metrics_dir / f"{name}_config.json"   # beside <name>_info.json
    meta = {"method": method, "teacher_arch": teacher.arch, "dataset": params.data.source, "optimiser": optim_how,
            "reconstruction": objective.method.reconstruction}
    history = run_training(student, objective, optim, params, train, heldout, device,
                           CHECKPOINTS / name if out_dir is None else out_dir / "checkpoint",
                           metrics_dir / f"{name}_history.csv", metrics_dir / f"{name}_train.json",
                           teacher=teacher, generated=generated,
                           fraction=params.ddpm.fraction if generated is not None else 0.0,
                           partner_labels=partner_labels, monitor_steps=cfg.monitor_pgd_steps,
                           extra_callbacks=[args.tracker.epoch_callback],
                           rank=dist_info.rank, world_size=dist_info.world_size,
                           best_file=best_path(model_path), best_meta=dict(meta), optim_how=optim_how)
    if not dist_info.is_main:
        return
    save_checkpoint(student, model_path, **meta, epochs=len(history))
    import hashlib
    selected = selected_path(model_path, cfg.select)
    args.tracker.set_tags({"method": method, "student": cfg.student.arch, "teacher": teacher.arch,
                           "optimiser": optim_how, "reconstruction": str(objective.method.reconstruction),
                           # how the registry finds the training run of a registered student: the
                           # checkpoint distill.select names (last or best) is the one exported
                           "checkpoint": cfg.select,
                           "checkpoint_sha256": hashlib.sha256(selected.read_bytes()).hexdigest(),
                           "last_checkpoint_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest()})
    for path in (metrics_dir / f"{name}_train.json", metrics_dir / f"{name}_history.csv", model_path,
                 best_path(model_path)):
        args.tracker.log_artifact(path)
    print(f"{method} student {cfg.student.arch} -> {model_path}: {history[-1]}")


def build_parser():
    p = parser(__doc__)
    p.add_argument("--seed", type=int, help="override run.seed (the comparison pipeline's seeds); recorded as run.seed")
    p.add_argument("--method", help="override distill.method (e.g. for the comparison pipeline)")
    p.add_argument("--variant", help="a DARWIN ablation of robustkd.methods.darwin.ABLATIONS: method darwin, "
                   "distill.settings.darwin overridden by the variant (the ablation pipeline)")
    p.add_argument("--name", help="model name (default: 'student', or the method with --out-dir)")
    p.add_argument("--out-dir", help="write model, history and checkpoint here instead of models/")
    p.add_argument("--schedule", choices=["shared", "official"],
                   help="override distill.schedule (the comparison passes compare.schedule)")
    return p


run = cli(main, build_parser, "distill", ("distill", "ddpm", "data", "run"))

if __name__ == "__main__":
    run()
