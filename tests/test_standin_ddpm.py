"""services/standin_ddpm.py: the CPU-scale stand-in for DeepMind's generated-data file holds the
profile's unused training images, in the public .npz layout that ingest_ddpm reads."""

import numpy as np
import pytest

from robustkd.data import load_image_folder, load_npz
from services import standin_ddpm

from .stage_fixtures import CLASSES, make_image_folder, tiny_params, write_params


def test_standin_holds_only_images_the_profile_does_not_use(tmp_path):
    make_image_folder(tmp_path / "img", train_per_class=10)
    params = write_params(tmp_path / "params.yaml", tiny_params(str(tmp_path / "img")))   # uses 6 + 1 per class
    out = tmp_path / "ddpm" / "standin.npz"
    standin_ddpm.main(["--params", str(params), "--per-class", "3", "--out", str(out)])

    images, labels = load_npz(out, num_classes=len(CLASSES))
    assert images.shape == (3 * len(CLASSES), 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * len(CLASSES)
    every = load_image_folder(tmp_path / "img" / "train")
    every_hwc = every.images.permute(0, 2, 3, 1).numpy()
    for c in range(len(CLASSES)):
        of_class = every_hwc[every.labels.numpy() == c]
        np.testing.assert_array_equal(images[labels == c], of_class[7:10])   # images 7..9: after train + heldout


def test_standin_refuses_a_profile_that_uses_every_image(tmp_path):
    make_image_folder(tmp_path / "img", train_per_class=4)
    p = tiny_params(str(tmp_path / "img"))
    p["data"]["train_per_class"] = None
    params = write_params(tmp_path / "params.yaml", p)
    with pytest.raises(SystemExit, match="train_per_class is null"):
        standin_ddpm.main(["--params", str(params), "--out", str(tmp_path / "x.npz")])
    assert not (tmp_path / "x.npz").exists()
