import numpy as np
import pytest
import torch

from robustkd.data import (ImageSet, MixedBatchSampler, PartnerSampler, TrainBatches, apply_crop_flip,
                           crop_flip_params, load_image_folder, load_npz, stratified_first_k, validate_batch)
from robustkd.errors import InputError

from .conftest import CIFAR_DIR


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_arrays(n=8):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, n)}


def test_npz_valid(tmp_path):
    images, labels = load_npz(write_npz(tmp_path / "g.npz", **good_arrays()), num_classes=10)
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8,)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.pop("label"), "missing key 'label'"),
    (lambda a: a.pop("image"), "missing key 'image'"),
    (lambda a: a.update(label=a["label"][:5]), "'image' has 8 entries but 'label' has 5"),
    (lambda a: a.update(image=a["image"].astype(np.float32)), "must be uint8.*float32"),
    (lambda a: a.update(image=a["image"][:, :16]), r"N x 32 x 32 x 3, found \(8, 16, 32, 3\)"),
    (lambda a: a.update(label=a["label"] + 10), r"labels must lie in \[0, 9\]"),
])
def test_npz_errors_name_file_and_problem(tmp_path, mutate, message):
    arrays = good_arrays()
    mutate(arrays)
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message) as err:
        load_npz(path, num_classes=10)
    assert "bad.npz" in str(err.value)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, image=np.array([object()], dtype=object), label=np.zeros(1))
    with pytest.raises(InputError, match="obj.npz"):
        load_npz(path)


def test_validate_batch_errors():
    with pytest.raises(InputError, match="float image tensor.*uint8"):
        validate_batch(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError, match=r"shape \(N, 3, H, W\), found \(2, 32, 32\)"):
        validate_batch(torch.zeros(2, 32, 32))
    with pytest.raises(InputError, match=r"\[0, 1\], found range"):
        validate_batch(torch.full((2, 3, 4, 4), 255.0))
    with pytest.raises(InputError, match=r"values in \[0, 9\], found \[0, 12\]"):
        validate_batch(torch.zeros(2, 3, 4, 4), torch.tensor([0, 12]), num_classes=10)


@pytest.fixture
def cifar_like_folder(tmp_path):
    """The shared CIFAR-10 copy where it exists, else an ImageFolder of the same classes made here, so
    that the test runs (and can fail) on a clean CI machine too."""
    if CIFAR_DIR.exists():
        return CIFAR_DIR
    from .stage_fixtures import make_image_folder

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return make_image_folder(tmp_path / "cifar", train_per_class=0, test_per_class=4, classes=names)


def test_image_folder_first_k_per_class_sorted(cifar_like_folder):
    data = load_image_folder(cifar_like_folder / "test", per_class=3)
    assert data.classes[0] == "airplane" and data.num_classes == 10
    assert data.images.dtype == torch.uint8 and data.images.shape == (30, 3, 32, 32)
    assert data.labels.tolist() == sorted([c for c in range(10) for _ in range(3)])


def test_stratified_first_k():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2])
    assert stratified_first_k(labels, 2).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="class 0 has only 3 images, 4 requested"):
        stratified_first_k(labels, 4)


def test_crop_flip_identity_and_shift():
    x = torch.rand(2, 3, 32, 32)
    centre = torch.tensor([[4, 4, 0], [4, 4, 1]])
    out = apply_crop_flip(x, centre)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(2))
    shifted = apply_crop_flip(x, torch.tensor([[0, 0, 0], [8, 8, 0]]))
    assert torch.equal(shifted[0, :, 4:, 4:], x[0, :, :28, :28]) and (shifted[0, :, :4] == 0).all()
    assert torch.equal(shifted[1, :, :28, :28], x[1, :, 4:, 4:])
    params = crop_flip_params(1000, torch.Generator().manual_seed(0))
    assert params[:, :2].min() == 0 and params[:, :2].max() == 8 and 400 < params[:, 2].sum() < 600


def test_partner_is_always_another_class_and_uniform():
    labels = torch.arange(10).repeat_interleave(20)
    sampler = PartnerSampler(labels, 10)
    y = torch.zeros(9000, dtype=torch.long)
    partners = sampler.sample(y, torch.Generator().manual_seed(0))
    classes = labels[partners]
    assert (classes != 0).all()
    counts = torch.bincount(classes, minlength=10)[1:]
    assert counts.min() > 850 and counts.max() < 1150  # ~1000 each of the nine others


def test_partner_needs_two_classes():
    with pytest.raises(InputError, match="at least two classes"):
        PartnerSampler(torch.zeros(5, dtype=torch.long), 10)


def test_mixed_sampler_fraction_and_epoch_length():
    sampler = MixedBatchSampler(num_real=100, num_generated=1000, batch_size=10, fraction=0.7)
    batches = list(sampler.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == 10  # num_real / batch with generated data
    assert all(len(r) == 3 and len(g) == 7 for r, g in batches)
    with pytest.raises(InputError, match="fraction is 0.5 but the generated set is empty"):
        MixedBatchSampler(100, 0, 10, 0.5)


def test_shards_of_a_global_batch_equal_the_single_process_batch():
    g = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.arange(40) % 4, ["a", "b", "c", "d"])
    single = list(TrainBatches(data, 8, torch.device("cpu"), with_partners=True).epoch(0, 0))
    ranks = [list(TrainBatches(data, 8, torch.device("cpu"), with_partners=True, rank=r,
                               world_size=2).epoch(0, 0)) for r in range(2)]
    for i, batch in enumerate(single):
        assert torch.equal(batch.x, torch.cat([ranks[0][i].x, ranks[1][i].x]))
        assert torch.equal(batch.x_pair, torch.cat([ranks[0][i].x_pair, ranks[1][i].x_pair]))
        assert (batch.y != batch.y_pair).all()


def test_global_batch_is_shuffled_before_sharding_so_ranks_see_the_same_mix():
    """Regression: the global batch was real-then-generated, so rank 0 got the real images."""
    from robustkd.data import GeneratedPool

    g = torch.Generator().manual_seed(2)
    real = ImageSet(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.arange(64) % 4, ["a", "b", "c", "d"])
    gen = GeneratedPool(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                        np.arange(64) % 4)
    kw = dict(generated=gen, fraction=0.5, augment=False)
    single = list(TrainBatches(real, 32, torch.device("cpu"), **kw).epoch(0, 0))
    ranks = [list(TrainBatches(real, 32, torch.device("cpu"), rank=r, world_size=2, **kw).epoch(0, 0))
             for r in range(2)]
    generated_share = []
    for i, batch in enumerate(single):
        both = [ranks[0][i], ranks[1][i]]
        assert torch.equal(batch.x, torch.cat([b.x for b in both]))
        assert torch.equal(batch.index, torch.cat([b.index for b in both]))
        for b in both:
            generated_share.append((b.index >= 64).float().mean().item())
            # the images are those the pool index names, in order
            for j, k in enumerate(b.index.tolist()):
                expected = real.images[k] if k < 64 else torch.from_numpy(gen.images[k - 64]).permute(2, 0, 1)
                assert torch.equal((b.x[j] * 255).round().to(torch.uint8), expected)
    assert 0.25 < np.mean(generated_share[0::2]) < 0.75 and 0.25 < np.mean(generated_share[1::2]) < 0.75


def test_non_rgb_image_files_are_counted_and_the_data_card_says_so(tmp_path, capsys):
    """Grayscale, RGBA and CMYK files are converted to RGB, and counted (not silently)."""
    from PIL import Image

    from robustkd.data import load_image_folder
    from stages.prepare_data import file_modes, say_conversions
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i, mode in enumerate(["RGB", "L", "RGBA", "CMYK"]):
            Image.new(mode, (32, 32)).save(tmp_path / cls / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    data = load_image_folder(tmp_path)
    assert data.source_modes == {"CMYK": 2, "L": 2, "RGB": 2, "RGBA": 2}
    assert file_modes(test=data) == {"test": {"modes": data.source_modes, "converted_to_rgb": 6}}
    say_conversions("test", data)
    assert "test: 6 of 8 images were not RGB (2 CMYK, 2 L, 2 RGBA); converted to RGB" in capsys.readouterr().out


def test_partner_sampling_uniform_other_image_weighs_classes_by_their_images():
    labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    s = PartnerSampler(labels, 3, "uniform_other_image")
    y = torch.zeros(20_000, dtype=torch.long)
    picked = labels[s.sample(y, torch.Generator().manual_seed(0))]
    assert (picked != 0).all()
    share = (picked == 1).float().mean().item()
    assert share == pytest.approx(30 / 90, abs=0.02)      # 'uniform_other_class' would give 1/2
    by_class = labels[PartnerSampler(labels, 3).sample(y, torch.Generator().manual_seed(0))]
    assert (by_class == 1).float().mean().item() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(InputError, match="partner_sampling must be one of"):
        PartnerSampler(labels, 3, "nearest")


def test_partner_pool_real_and_unaugmented_partners():
    from robustkd.data import GeneratedPool

    g = torch.Generator().manual_seed(0)
    real = ImageSet(torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(20) % 4,
                    [str(i) for i in range(4)])
    gen_imgs = np.full((12, 32, 32, 3), 7, dtype=np.uint8)          # generated images: constant 7
    generated = GeneratedPool(gen_imgs, np.arange(12) % 4)
    batches = TrainBatches(real, 8, torch.device("cpu"), generated=generated, fraction=0.5, with_partners=True,
                           partner_pool="real", partner_augment=False)
    real_float = real.images.float() / 255
    for b in batches.epoch(0, 0):
        assert (b.y_pair != b.y).all()
        for xp in b.x_pair:                                           # every partner a real, un-augmented image
            assert any(torch.allclose(xp, r) for r in real_float)
