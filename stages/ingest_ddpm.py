"""Stage ingest_ddpm: generated images -> validated, de-duplicated against the test set,
subsampled, labelled (by the teacher where labels are missing or ``relabel: true``) and
stored as .npy files for memory-mapped reading in data/generated/.

Sources: ``npz`` (the public format: ``image`` uint8 N x 32 x 32 x 3, ``label``), ``diffusers``
(sample a local DDPM checkpoint directory) or ``none`` (an empty set). Every check runs before
anything is written, so a bad file leaves the previous outputs intact.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from robustkd.data import load_npz, to_chw_tensor, to_float
from robustkd.errors import InputError
from robustkd.checkpoints import load_checkpoint
from robustkd.utils import atomic_path, progress

from services.common import GENERATED, METRICS, MODELS, PREPARED, cli, load_imageset, parser, read_params, setup_run, write_json
from services.params import DdpmParams


def image_hashes(images_hwc: np.ndarray) -> np.ndarray:
    return np.array([hashlib.sha1(img.tobytes()).hexdigest() for img in images_hwc])


def read_npz_files(cfg: DdpmParams, num_classes: int):
    if not cfg.files:
        raise InputError("ddpm.source is 'npz' but ddpm.files is empty")
    images, labels = [], []
    for path in cfg.files:
        img, lab = load_npz(path, num_classes=num_classes, require_labels=False, mmap=False)
        if len(img) == 0:
            raise InputError(f"{path}: 'image' holds 0 images; expected at least one (ddpm.files)")
        images.append(img)
        labels.append(lab)
    missing = [f for f, lab in zip(cfg.files, labels) if lab is None]
    all_labels = None if missing else np.concatenate([lab for lab in labels if lab is not None]).astype(np.int64)
    return np.concatenate(images), all_labels, missing


def sample_diffusers(cfg: DdpmParams, seed: int, device: torch.device) -> np.ndarray:
    """Images from a local diffusers DDPM pipeline directory, in batches."""
    try:
        from diffusers import DDIMScheduler, DDPMPipeline
    except ImportError as exc:
        raise InputError("ddpm.source 'diffusers' needs the diffusers package") from exc
    d = cfg.diffusers
    if not d.model_dir:
        raise InputError("ddpm.source is 'diffusers' but ddpm.diffusers.model_dir is empty")
    try:
        pipe = DDPMPipeline.from_pretrained(d.model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"ddpm.diffusers.model_dir {d.model_dir}: not a loadable DDPM pipeline: {exc}") from None
    if d.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    batches = range(0, cfg.num_images, d.batch_size)
    for start in progress(batches, total=len(batches), desc="ddpm sampling"):
        n = min(d.batch_size, cfg.num_images - start)
        imgs = pipe(batch_size=n, num_inference_steps=d.inference_steps, generator=gen, output_type="np").images
        out.append(np.clip(np.rint(imgs * 255), 0, 255).astype(np.uint8))
    images = np.concatenate(out)
    if images.shape[1:] != (32, 32, 3):
        raise InputError(f"ddpm.diffusers.model_dir {d.model_dir}: model samples shape {images.shape[1:]}, "
                         f"expected 32 x 32 x 3")
    return images


def teacher_labels(images_hwc: np.ndarray, device: torch.device, batch: int = 512):
    teacher = load_checkpoint(MODELS / "teacher.pt").to(device)
    labels, conf = [], []
    with torch.no_grad():
        for i in range(0, len(images_hwc), batch):
            x = to_float(to_chw_tensor(images_hwc[i:i + batch])).to(device)
            p = torch.softmax(teacher(x), 1)
            c, lab = p.max(1)
            labels.append(lab.cpu())
            conf.append(c.cpu())
    return torch.cat(labels).numpy().astype(np.int64), torch.cat(conf).numpy().astype(np.float32)


def save_npy(path, array) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def split_report(report: dict) -> tuple[dict, dict]:
    """(numbers, the rest): DVC metrics hold plain numbers only (`dvc metrics show` lists each as a
    column); the text and the per-class counts (one column per class) go to the *_info.json."""
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return ({k: v for k, v in report.items() if is_number(v)},
            {k: v for k, v in report.items() if not is_number(v)})


def main(args) -> None:
    params = read_params(args)
    cfg = params.ddpm
    args.tracker.log_params({"run": {"seed": params.run.seed}})   # the seed it ran with
    device = setup_run(params)
    test = load_imageset(PREPARED / "test.npz")
    num_classes = test.num_classes
    report: dict = {"source": cfg.source}
    if cfg.source == "none":
        images = np.zeros((0, 32, 32, 3), np.uint8)
        labels, conf = np.zeros(0, np.int64), np.zeros(0, np.float32)
        report["note"] = "no generated data (ddpm.source: none); distillation uses real images only"
    else:
        if cfg.source == "npz":
            images, labels, missing = read_npz_files(cfg, num_classes)
            report["files"] = list(cfg.files)
            report["files_without_labels"] = missing
        else:
            if cfg.num_images <= 0:
                raise InputError("ddpm.source is 'diffusers' but ddpm.num_images is not positive")
            images, labels = sample_diffusers(cfg, params.run.seed, device), None
        report["num_read"] = int(len(images))
        if cfg.drop_test_duplicates:
            test_hashes = set(image_hashes(test.images.permute(0, 2, 3, 1).numpy()))
            dup = np.array([h in test_hashes for h in image_hashes(images)], dtype=bool)
            report["test_duplicates_dropped"] = int(dup.sum())
            images = images[~dup]
            labels = labels[~dup] if labels is not None else None
        if cfg.num_images and len(images) > cfg.num_images:
            keep = np.sort(np.random.default_rng(params.run.seed).choice(len(images), cfg.num_images, replace=False))
            images = images[keep]
            labels = labels[keep] if labels is not None else None
        if labels is None or cfg.relabel:
            if not (MODELS / "teacher.pt").exists():
                raise InputError("generated images need teacher labels but models/teacher.pt does not exist")
            given = labels
            labels, conf = teacher_labels(images, device)
            report["labelled_by"] = "teacher"
            report["mean_teacher_confidence"] = float(conf.mean()) if len(conf) else None
            if given is not None:
                report["agreement_with_given_labels"] = float((given == labels).mean()) if len(labels) else None
        else:
            conf = np.ones(len(labels), np.float32)
            report["labelled_by"] = "file"
    assert labels is not None   # given by the files or by the teacher above
    counts = np.bincount(labels, minlength=num_classes) if len(labels) else np.zeros(num_classes, int)
    report["num_images"] = int(len(images))
    report["per_class"] = {str(c): int(n) for c, n in enumerate(counts)}
    imbalance = float(counts.max() / max(counts.min(), 1)) if len(labels) else 0.0
    report["class_imbalance"] = imbalance
    if cfg.max_class_imbalance and imbalance > cfg.max_class_imbalance:
        raise InputError(f"generated data: class imbalance max/min = {imbalance:.2f} exceeds "
                         f"ddpm.max_class_imbalance = {cfg.max_class_imbalance}")
    GENERATED.mkdir(parents=True, exist_ok=True)
    save_npy(GENERATED / "images.npy", images)
    save_npy(GENERATED / "labels.npy", labels)
    save_npy(GENERATED / "confidence.npy", conf)
    numbers, text = split_report(report)
    write_json(text, METRICS / "ddpm_info.json")
    write_json(numbers, METRICS / "ddpm.json")  # last: a failed run leaves the previous report
    args.tracker.log_metrics(numbers)
    args.tracker.log_artifact(METRICS / "ddpm.json")
    args.tracker.log_artifact(METRICS / "ddpm_info.json")
    print(f"generated data: {report['num_images']} images ({cfg.source})")


def build_parser():
    return parser(__doc__)


run = cli(main, build_parser, "ingest_ddpm", ("ddpm",), config=METRICS / "ddpm_config.json")

if __name__ == "__main__":
    run()
