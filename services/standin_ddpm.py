"""A stand-in for DeepMind's generated-data file at CPU scale, in its public format.

The slides' self-distillation table mixes 30 % real and 70 % DDPM images (DeepMind's 1M sets,
Gowal et al. 2021 / Rebuffi et al. 2021). Those files are not reachable on a machine without
network, so the CPU-scale preset ``cpu-ddpm`` reads this stand-in instead: real CIFAR training
images that the CPU profile does **not** use (those after the first ``train_per_class +
heldout_per_class`` of each class), with their labels, written as ``image`` uint8 N x 32 x 32 x 3
and ``label`` int64, exactly the layout of ``cifar10_ddpm.npz``. It exercises the recipe
(ingestion, test-set de-duplication, the 30/70 batches, every method on the mixture), not the value
of generated images: results on it are not evidence about DDPM data.

    python -m services.standin_ddpm                        # data/ddpm/cpu_standin.npz from params.yaml
    python -m services.standin_ddpm --per-class 2000 --out data/ddpm/cpu_standin.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robustkd.data import load_image_folder

from .common import data_root, save_arrays
from .params import load_params

DEFAULT_OUT = "data/ddpm/cpu_standin.npz"


def standin_arrays(train_dir: Path, skip: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``skip .. skip + per_class - 1`` of each class of ``train_dir`` (sorted file order, as
    ``prepare_data`` reads them), as (uint8 N x 32 x 32 x 3, int64 labels)."""
    data = load_image_folder(train_dir, per_class=skip + per_class)
    labels = data.labels.numpy()
    keep = np.concatenate([np.flatnonzero(labels == c)[skip:] for c in range(len(data.classes))])
    images_hwc = data.images[keep].permute(0, 2, 3, 1).contiguous().numpy()
    return images_hwc.astype(np.uint8, copy=False), labels[keep].astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--per-class", type=int, default=2000, help="stand-in images per class (default 2000)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = load_params(args.params).data
    if cfg.source != "imagefolder":
        raise SystemExit(f"{args.params}: data.source is {cfg.source!r}; the stand-in reads an ImageFolder tree")
    if cfg.train_per_class is None:
        raise SystemExit(f"{args.params}: data.train_per_class is null (every training image is used); "
                         "no unused images are left for a stand-in")
    skip = cfg.train_per_class + cfg.heldout_per_class
    images, labels = standin_arrays(data_root(cfg.root) / "train", skip, args.per_class)
    save_arrays(args.out, image=images, label=labels)
    print(f"{args.out}: {len(labels)} images ({args.per_class} per class after the first {skip} of "
          f"{data_root(cfg.root) / 'train'}), the public DDPM .npz layout")


if __name__ == "__main__":
    main()
