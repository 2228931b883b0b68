"""Stage attention: Grad-CAM maps of the teacher, the student and the non-adversarial reference on
the same clean and PGD-20 images (robustkd/attention.py), as a figure for the report and MLflow.

The PGD-20 images are crafted once, against ``attention.attack_model`` (the student by default),
with the evaluation's eps, steps and step size (the random start seeded by ``run.seed``), and
shown to all three models; the class mapped is the true one. The layer of each architecture is
``attention.layers[arch]`` or the family default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robustkd.attacks import pgd_ce
from robustkd.attention import grad_cam, layer_for
from robustkd.data import to_float
from robustkd.checkpoints import load_checkpoint
from robustkd.utils import atomic_path, make_generator

from services.common import (METRICS, MODELS, PREPARED, REPORTS, cli, load_imageset, parser, read_params,
                             setup_run, write_json)

MODEL_NAMES = ("teacher", "student", "reference")


def pick_images(labels: torch.Tensor, count: int) -> list[int]:
    """The first test image of each class, for the first ``count`` classes (as many as exist)."""
    out = []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx):
            out.append(int(idx[0]))
        if len(out) == count:
            break
    return out


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map as a jet heat map added to the image and rescaled (pytorch-grad-cam's
    ``show_cam_on_image``, with matplotlib's colormap instead of OpenCV's)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    out = heat + image
    return out / out.max()


def figure(x: torch.Tensor, x_adv: torch.Tensor, maps: dict, preds: dict, labels: list[int],
           classes: list[str], layers: dict, attack: str, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = (("clean", x), (attack, x_adv))
    cols = ([("clean", None)] + [("clean", m) for m in MODEL_NAMES]
            + [(attack, None)] + [(attack, m) for m in MODEL_NAMES])
    n = len(labels)
    fig, axes = plt.subplots(n, len(cols), figsize=(1.5 * len(cols), 1.6 * n + 0.6), squeeze=False)
    for i in range(n):
        for j, (kind, name) in enumerate(cols):
            ax = axes[i][j]
            image = dict(kinds)[kind][i].permute(1, 2, 0).numpy()
            if name is None:
                ax.imshow(image)
                ax.set_title(f"{kind}\n{classes[labels[i]]}" if i == 0 else classes[labels[i]], fontsize=7)
            else:
                cam = maps[name, kind][i].numpy()
                ax.imshow(overlay(image, cam))
                pred = preds[name, kind][i]
                title = f"{name}\n{layers[name].removeprefix('backbone.')}\n" if i == 0 else ""
                zero = " (map 0)" if cam.max() == 0 else ""   # nothing at the layer raises the true class
                ax.set_title(f"{title}pred {classes[pred]}{zero}", fontsize=7,
                             color="green" if pred == labels[i] else "red")
            ax.axis("off")
    fig.suptitle(f"Grad-CAM of the true class: clean (left) and {attack} images (right)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def main(args) -> None:
    params = read_params(args)
    cfg = params.attention
    args.tracker.log_params({"run": {"seed": params.run.seed}})   # the seed it ran with
    ev = params.evaluate.config
    device = setup_run(params)
    test = load_imageset(PREPARED / "test.npz")
    index = pick_images(test.labels, cfg.images)
    x = to_float(test.images[index]).to(device)
    y = test.labels[index].to(device)
    models = {name: load_checkpoint(MODELS / f"{name}.pt").to(device).eval() for name in MODEL_NAMES}
    x_adv = pgd_ce(models[cfg.attack_model], x, y, eps=ev.eps, alpha=ev.pgd_step_size, steps=ev.pgd_steps,
                   generator=make_generator(params.run.seed, device))
    layers = {name: layer_for(m.arch, cfg.layers) for name, m in models.items()}
    attack = f"PGD-{ev.pgd_steps}"
    maps, preds, backends = {}, {}, set()
    for name, model in models.items():
        for kind, images in (("clean", x), (attack, x_adv)):
            maps[name, kind], backend = grad_cam(model, layers[name], images, y, cfg.backend)
            backends.add(backend)
            with torch.no_grad():
                preds[name, kind] = model(images).argmax(1).tolist()
    REPORTS.mkdir(exist_ok=True)
    out = figure(x.cpu(), x_adv.cpu(), maps, preds, y.tolist(), test.classes, layers, attack,
                 REPORTS / "attention.png")
    info = {"backend": sorted(backends), "layers": {n: f"{models[n].arch}: {layers[n]}" for n in MODEL_NAMES},
            "test_indices": index, "labels": y.tolist(),
            "attack": f"{attack} against the {cfg.attack_model}, eps {ev.eps:.5f}, "
                      f"step {ev.pgd_step_size:.5f}, seed {params.run.seed} (run.seed)",
            "predictions": {f"{n} {k}": p for (n, k), p in preds.items()}}
    write_json(info, METRICS / "attention_info.json")
    args.tracker.log_artifact(out)
    args.tracker.log_artifact(METRICS / "attention_info.json")
    print(f"Grad-CAM ({', '.join(sorted(backends))}) of {len(index)} images written to {out}")


def build_parser():
    return parser(__doc__)


run = cli(main, build_parser, "attention", ("attention", "evaluate"), config=METRICS / "attention_config.json")

if __name__ == "__main__":
    run()
