"""Stage prepare_data: raw CIFAR (torchvision format) or an ImageFolder tree -> uint8 arrays
(train, held-out, test) in data/prepared/ and a data card in metrics/data_card.json."""

from __future__ import annotations

import torch

from robustkd.data import ImageSet, check_same_classes, imageset_sha256, load_image_folder, load_torchvision_cifar
from robustkd.errors import InputError

from services.common import (METRICS, PREPARED, cli, data_root, parser, read_params, save_imageset,
                             write_json)
from services.params import DataParams


def split_per_class(data: ImageSet, first: int | None, then: int) -> tuple[ImageSet, ImageSet]:
    """Per class: the first ``first`` images (all but ``then`` when None), then the next ``then``."""
    keep, held = [], []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).flatten()
        n_first = len(idx) - then if first is None else first
        if n_first + then > len(idx) or n_first <= 0:
            raise InputError(f"data: class {data.classes[c]!r} has {len(idx)} training images; "
                             f"train_per_class={first} plus heldout_per_class={then} do not fit")
        keep.append(idx[:n_first])
        held.append(idx[n_first:n_first + then])
    return data.subset(torch.sort(torch.cat(keep)).values), data.subset(torch.sort(torch.cat(held)).values)


def load_split(cfg: DataParams, train: bool, per_class: int | None) -> ImageSet:
    if cfg.source == "imagefolder":
        return load_image_folder(data_root(cfg.root) / ("train" if train else "test"), per_class=per_class)
    data = load_torchvision_cifar(cfg.source, data_root(cfg.root), train=train, download=cfg.download)
    if per_class is not None:
        from robustkd.data import stratified_first_k
        data = data.subset(stratified_first_k(data.labels, per_class, data.num_classes))
    return data


def card(data: ImageSet) -> dict:
    return {"num_images": len(data),
            "per_class": {c: int((data.labels == i).sum()) for i, c in enumerate(data.classes)},
            "sha256": imageset_sha256(data)}


def file_modes(**splits: ImageSet) -> dict:
    """The PIL modes of the image files read per split, and how many were converted to RGB (empty
    for CIFAR archives, which hold RGB arrays)."""
    return {name: {"modes": data.source_modes,
                   "converted_to_rgb": sum(n for m, n in data.source_modes.items() if m != "RGB")}
            for name, data in splits.items() if data.source_modes is not None}


def say_conversions(name: str, data: ImageSet) -> None:
    converted = {m: n for m, n in (data.source_modes or {}).items() if m != "RGB"}
    if converted:
        print(f"{name}: {sum(converted.values())} of {len(data)} images were not RGB "
              f"({', '.join(f'{n} {m}' for m, n in converted.items())}); converted to RGB "
              f"(counted in metrics/data_card.json)")


def main(args) -> None:
    params = read_params(args)
    cfg = params.data
    if args.download_only:
        args.config_path = None   # not a pipeline run: the configuration of the last one stays
        if cfg.source == "imagefolder":
            print(f"data.source is imagefolder ({cfg.root}): nothing to download")
            return
        for is_train in (True, False):
            load_torchvision_cifar(cfg.source, data_root(cfg.root), train=is_train, download=True)
        print(f"{cfg.source} downloaded to {cfg.root}")
        return
    limit = None if cfg.train_per_class is None else cfg.train_per_class + cfg.heldout_per_class
    train_all = load_split(cfg, train=True, per_class=limit)
    say_conversions("train", train_all)
    train, heldout = split_per_class(train_all, cfg.train_per_class, cfg.heldout_per_class)
    test = load_split(cfg, train=False, per_class=cfg.test_per_class)
    say_conversions("test", test)
    check_same_classes({"train": train.classes, "held-out": heldout.classes, "test": test.classes},
                       f"data.root {cfg.root}")
    PREPARED.mkdir(parents=True, exist_ok=True)
    for name, data in [("train", train), ("heldout", heldout), ("test", test)]:
        save_imageset(data, PREPARED / f"{name}.npz")
    cards = {"train": card(train), "heldout": card(heldout), "test": card(test)}
    write_json({"source": cfg.source, "root": cfg.root, "classes": train.classes, **cards,
                "file_modes": file_modes(train_and_heldout=train_all, test=test)},
               METRICS / "data_card.json")
    args.tracker.log_metrics({f"{name}_images": len(data) for name, data in
                              [("train", train), ("heldout", heldout), ("test", test)]})
    args.tracker.log_artifact(METRICS / "data_card.json")
    args.tracker.log_params({"prepared": {name: {"sha256": c["sha256"], "num_images": c["num_images"]}
                                          for name, c in cards.items()}})   # the data card's identity
    for name, data, context in [("train", train, "training"), ("heldout", heldout, "validation"), ("test", test, "testing")]:
        args.tracker.log_imageset(data, PREPARED / f"{name}.npz", name, context,
                                  {"source": cfg.source, "root": cfg.root})
    print(f"prepared {len(train)} train, {len(heldout)} held-out, {len(test)} test images from {cfg.root}")


def build_parser():
    p = parser(__doc__)
    p.add_argument("--download-only", action="store_true",
                   help="only download a torchvision dataset into data.root (before the first dvc repro)")
    return p


run = cli(main, build_parser, "prepare_data", ("data",), config=METRICS / "data_config.json")

if __name__ == "__main__":
    run()
