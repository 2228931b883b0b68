"""Data: loading (torchvision CIFAR, ImageFolder trees, generated .npz), validation,
batched on-device augmentation, real/generated mixing and DARWIN's partner sampling.

Images are held as uint8 tensors N x 3 x 32 x 32 (CHW) and turned into float [0, 1] only per
batch, on the training device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

IMAGE_SHAPE_HWC = (32, 32, 3)


@dataclass
class ImageSet:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,), with class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    # PIL modes of the decoded files ({"RGB": 990, "L": 10}) where they were read from image files;
    # non-RGB ones were converted to RGB (the data card says how many).
    source_modes: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes)


# ---------------------------------------------------------------- validation
def validate_arrays(images: np.ndarray, labels: np.ndarray | None, num_classes: int | None,
                    source: str) -> None:
    """Check the public generated-data format: uint8 N x 32 x 32 x 3 and integer labels."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        found = getattr(images, "dtype", type(images).__name__)
        raise InputError(f"{source}: 'image' must be uint8 (values 0..255), found dtype {found}")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE_HWC:
        raise InputError(f"{source}: 'image' must have shape N x 32 x 32 x 3, found {tuple(images.shape)}")
    if labels is None:
        return
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{source}: 'label' must be a 1-D integer array, found shape "
                         f"{tuple(labels.shape)} dtype {labels.dtype}")
    if len(labels) != len(images):
        raise InputError(f"{source}: 'image' has {len(images)} entries but 'label' has {len(labels)}")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{source}: labels must lie in [0, {num_classes - 1}], found range "
                         f"[{labels.min()}, {labels.max()}]")


def validate_batch(x: torch.Tensor, y: torch.Tensor | None = None, num_classes: int | None = None,
                   name: str = "x") -> None:
    """Check a float image batch in [0, 1] (N, 3, H, W) and its labels."""
    if not torch.is_floating_point(x):
        raise InputError(f"{name}: expected a float image tensor in [0, 1], found dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"{name}: expected shape (N, 3, H, W), found {tuple(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise InputError(f"{name}: pixel values must lie in [0, 1], found range "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]")
    if y is not None:
        if y.shape != (x.shape[0],):
            raise InputError(f"labels for {name}: expected shape ({x.shape[0]},), found {tuple(y.shape)}")
        if num_classes is not None and y.numel() and (y.min() < 0 or y.max() >= num_classes):
            raise InputError(f"labels for {name}: expected values in [0, {num_classes - 1}], found "
                             f"[{y.min().item()}, {y.max().item()}]")


def to_chw_tensor(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_hwc)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- loading
def load_image_folder(root: str | os.PathLike, per_class: int | None = None) -> ImageSet:
    """An ImageFolder tree (class folders in sorted order, files in sorted name order).

    ``per_class`` keeps the first k files of each class: the stratified "first k" subset.
    """
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist or is not a directory")
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, OSError) as exc:  # no class folders, a class folder without images
        raise InputError(f"image folder {root}: expected one folder per class holding images "
                         f"(.png, .jpg, ...); {str(exc).splitlines()[0]}") from None
    samples = first_k_per_class(folder.samples, per_class) if per_class else folder.samples
    images = np.empty((len(samples), *IMAGE_SHAPE_HWC), dtype=np.uint8)
    modes: dict[str, int] = {}
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as img:
                modes[img.mode] = modes.get(img.mode, 0) + 1
                arr = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as exc:  # truncated or not an image (PIL.UnidentifiedImageError)
            raise InputError(f"{path}: expected a 32 x 32 RGB image, found a file that cannot be decoded "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
        if arr.shape != IMAGE_SHAPE_HWC:
            raise InputError(f"{path}: expected a 32 x 32 RGB image, found shape {arr.shape}")
        images[i] = arr
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return ImageSet(to_chw_tensor(images), torch.from_numpy(labels), list(folder.classes), dict(sorted(modes.items())))


def check_same_classes(lists: dict[str, list[str]], source: str) -> list[str]:
    """The class lists of the splits must agree, names and order (label i is one class
    everywhere); returns the common list."""
    (first, classes), *rest = lists.items()
    for name, other in rest:
        if list(other) != list(classes):
            raise InputError(f"{source}: the {first} classes {list(classes)} differ from the {name} "
                             f"classes {list(other)}; expected the same names in the same order")
    return list(classes)


def first_k_per_class(samples: list[tuple[str, int]], k: int) -> list[tuple[str, int]]:
    seen: dict[int, int] = {}
    out = []
    for path, label in samples:
        if seen.get(label, 0) < k:
            seen[label] = seen.get(label, 0) + 1
            out.append((path, label))
    return out


# The python versions of CIFAR (https://www.cs.toronto.edu/~kriz/cifar.html): archive and folder names.
CIFAR_LAYOUT = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
                "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python")}


def cifar_class(name: str, checksums: dict | None = None):
    """torchvision's dataset class for ``name``; ``checksums`` (``train_list``, ``test_list``,
    ``meta`` in torchvision's format) replace the published md5 sums (tests build small archives)."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(name)
    if cls is None:
        raise InputError(f"unknown torchvision dataset {name!r}; expected 'cifar10' or 'cifar100'")
    return type(cls.__name__, (cls,), dict(checksums)) if checksums else cls


def locate_cifar(name: str, root: str | os.PathLike) -> tuple[str, Path] | tuple[None, None]:
    """A local copy of CIFAR under ``root``: ("folder", base) when ``base/<batches folder>`` exists
    (``root`` itself may be that folder), ("archive", file) for the ``.tar.gz`` (``root`` itself, or
    inside ``root``); (None, None) when there is none."""
    archive, folder = CIFAR_LAYOUT[name]
    root = Path(root)
    if root.is_file():
        return "archive", root
    if root.name == folder and root.is_dir():
        return "folder", root.parent
    if (root / folder).is_dir():
        return "folder", root
    if (root / archive).is_file():
        return "archive", root / archive
    return None, None


def check_cifar_files(cls, base: Path) -> None:
    """Every batch and the meta file present with torchvision's md5 sums, before torchvision reads
    them: one error naming the file, the expected and the found sum."""
    from torchvision.datasets.utils import calculate_md5

    for filename, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]:
        path = base / cls.base_folder / filename
        if not path.is_file():
            raise InputError(f"{path} does not exist: expected the {cls.base_folder} folder of "
                             f"{cls.filename} with its files {[f for f, _ in cls.train_list + cls.test_list]}")
        found = calculate_md5(str(path))
        if found != md5:
            raise InputError(f"{path}: md5 {found}, expected {md5} (torchvision's sum for {cls.filename}): "
                             "a corrupted or different file")


def extract_cifar(archive: Path, folder: str, into: Path) -> None:
    """The archive's ``folder/`` members (regular files only, no absolute or parent paths) into ``into``."""
    import shutil
    import tarfile

    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(folder + "/")
                       and ".." not in Path(m.name).parts]
            if not members:
                raise InputError(f"{archive}: no files under {folder}/ in the archive; expected the python "
                                 f"version of CIFAR ({CIFAR_LAYOUT})")
            for m in members:
                dest = into / m.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                # regular files only (above): extractfile returns a file, never None
                with tar.extractfile(m) as src, open(dest, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{archive}: not a readable .tar.gz archive: {exc}") from None


def load_torchvision_cifar(name: str, root: str | os.PathLike, train: bool, download: bool = True,
                           checksums: dict | None = None) -> ImageSet:
    """CIFAR-10/100 in torchvision's format from a local copy at ``root`` (the python archive
    ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, its extracted folder, or a folder
    holding either), else downloaded to ``root`` where ``download`` and a network exist. An
    archive is extracted into a temporary folder, never next to it; files are checked against
    torchvision's md5 sums first."""
    import tempfile

    cls = cifar_class(name, checksums)
    archive, folder = CIFAR_LAYOUT[name]
    kind, where = locate_cifar(name, root)
    if kind == "archive":
        assert where is not None
        with tempfile.TemporaryDirectory(prefix="robustkd-cifar-") as tmp:
            extract_cifar(where, folder, Path(tmp))
            return _read_cifar(cls, name, Path(tmp), train, f"{where}")
    if kind == "folder":
        assert where is not None
        return _read_cifar(cls, name, where, train, f"{where / folder}")
    if not download:
        raise InputError(f"no local copy of {name} at {root}: expected the archive {archive} or its extracted "
                         f"folder {folder}/ (data.root may name either, or a folder holding one); or set "
                         "data.download: true where a network exists")
    try:
        cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - report any download or format failure as bad input
        raise InputError(f"cannot download {name} to {root}: {exc}") from None
    return _read_cifar(cls, name, Path(root), train, f"{root}")


def _read_cifar(cls, name: str, base: Path, train: bool, source: str) -> ImageSet:
    check_cifar_files(cls, base)
    try:
        ds = cls(str(base), train=train, download=False)
    except Exception as exc:  # noqa: BLE001 - a malformed batch file is bad input
        raise InputError(f"cannot read {name} from {source}: {exc}") from None
    return ImageSet(to_chw_tensor(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def load_npz(path: str | os.PathLike, num_classes: int | None = None, require_labels: bool = True,
             mmap: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A generated-data file: ``image`` uint8 N x 32 x 32 x 3 and ``label`` integers.

    Read without pickle. Returns (images_hwc, labels or None).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file does not exist")
    try:
        with np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None) as npz:
            keys = set(npz.files)
            if "image" not in keys:
                raise InputError(f"{path}: missing key 'image' (found keys {sorted(keys)})")
            if require_labels and "label" not in keys:
                raise InputError(f"{path}: missing key 'label' (found keys {sorted(keys)})")
            images = npz["image"]
            labels = npz["label"] if "label" in keys else None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format errors, pickled object arrays
        raise InputError(f"{path}: not a readable .npz of plain arrays: {exc}") from None
    if labels is not None:
        labels = np.asarray(labels).reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    validate_arrays(images, labels, num_classes, str(path))
    return images, labels


def stratified_first_k(labels: torch.Tensor, k: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices of the first ``k`` images of each class, in dataset order."""
    labels = torch.as_tensor(labels)
    num_classes = num_classes or int(labels.max()) + 1
    keep = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()[:k]
        if len(idx) < k:
            raise InputError(f"stratified subset: class {c} has only {len(idx)} images, {k} requested")
        keep.append(idx)
    return torch.sort(torch.cat(keep)).values


# ---------------------------------------------------------------- augmentation
def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255.0)


def crop_flip_params(n: int, generator: torch.Generator | None = None, pad: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Random (row offset, column offset, flip) for ``n`` images, drawn on the CPU."""
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return torch.stack([oy, ox, flips.long()], 1)


def apply_crop_flip(x: torch.Tensor, params: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Batched RandomCrop(32, padding=pad) + RandomHorizontalFlip on ``x``'s device.

    Zero padding, as torchvision's RandomCrop; ``params`` from :func:`crop_flip_params`.
    """
    n, c, h, w = x.shape
    dev = x.device
    params = params.to(dev)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = params[:, 0:1] + torch.arange(h, device=dev)[None, :]
    cols = params[:, 1:2] + torch.arange(w, device=dev)[None, :]
    cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)
    bidx = torch.arange(n, device=dev)[:, None, None, None]
    cidx = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bidx, cidx, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4,
                     flip: bool = True) -> torch.Tensor:
    return apply_crop_flip(x, crop_flip_params(len(x), generator, pad, flip), pad)



def imageset_sha256(data: ImageSet) -> str:
    """The data card's hash of an image set: sha256 of its uint8 images then its int64 labels
    (the prepare_data stage's metrics and the MLflow dataset input record it)."""
    import hashlib

    return hashlib.sha256(data.images.numpy().tobytes() + data.labels.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- sampling
PARTNER_SAMPLING = ("uniform_other_class", "uniform_other_image")


class PartnerSampler:
    """DARWIN's partner (docs/methods.md, "DARWIN"; the method's ``partner_sampling`` [choice]):
    'uniform_other_class' - a class drawn uniformly from the *other* classes, then an image drawn
    uniformly from that class; 'uniform_other_image' - an image drawn uniformly from all images
    of the other classes (each class then weighs by its image count)."""

    def __init__(self, labels: torch.Tensor, num_classes: int, mode: str = "uniform_other_class"):
        if mode not in PARTNER_SAMPLING:
            raise InputError(f"partner_sampling must be one of {list(PARTNER_SAMPLING)}, found {mode!r}")
        self.mode = mode
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        self.num_classes = num_classes
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=num_classes)
        self.order = order
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.present = torch.nonzero(counts > 0).flatten()
        if len(self.present) < 2:
            raise InputError(f"partner sampling needs images of at least two classes, found "
                             f"{len(self.present)} class(es) with images")

    def sample(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices of one partner for each label in ``y`` (a class != y)."""
        y = torch.as_tensor(y, dtype=torch.long).cpu()
        if self.mode == "uniform_other_image":
            return self._uniform_other_image(y, generator)
        k = len(self.present)
        # Position of y among present classes; draw one of the k-1 others uniformly.
        pos = torch.searchsorted(self.present, y)
        is_present = (pos < k) & (self.present[pos.clamp(max=k - 1)] == y)
        shift = torch.randint(1, k, y.shape, generator=generator)
        other_pos = torch.where(is_present, (pos + shift) % k,
                                torch.randint(0, k, y.shape, generator=generator))
        cls = self.present[other_pos]
        r = torch.rand(y.shape, generator=generator)
        within = (r * self.counts[cls]).long().clamp(max=self.counts[cls] - 1)
        return self.order[self.offsets[cls] + within]

    def _uniform_other_image(self, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A uniform position among the images of other classes: positions in the class-sorted
        order, y's own block skipped."""
        counts = self.counts[y.clamp(max=self.num_classes - 1)] * (y < self.num_classes)
        offsets = self.offsets[y.clamp(max=self.num_classes - 1)]
        others = len(self.order) - counts
        pos = (torch.rand(y.shape, generator=generator) * others).long().clamp(max=others - 1)
        pos = torch.where(pos >= offsets, pos + counts, pos)
        return self.order[pos]


class MixedBatchSampler:
    """Global batches of indices mixing a real pool and a generated pool.

    Each batch has ``round(fraction * batch_size)`` generated images, drawn with replacement
    (the recipe of the DDPM literature), and the rest real images, drawn without replacement
    from a fresh permutation each pass. ``batches_per_epoch`` defaults to
    ceil(num_real / real-per-batch) without generated data and ceil(num_real / batch) with it.

    Yields (real_index, generated_index) per batch. Everything is drawn for the *global*
    batch from a generator seeded identically on every rank; ``shard`` then cuts out a rank's
    part, so a distributed run sees exactly the images of a single-process run.
    """

    def __init__(self, num_real: int, num_generated: int, batch_size: int, fraction: float = 0.0,
                 batches_per_epoch: int | None = None, drop_last: bool = True):
        if not 0.0 <= fraction <= 1.0:
            raise InputError(f"generated-data fraction must lie in [0, 1], found {fraction}")
        if fraction > 0 and num_generated == 0:
            raise InputError(f"generated-data fraction is {fraction} but the generated set is empty")
        self.num_real, self.num_generated = num_real, num_generated
        self.batch_size = batch_size
        self.num_gen_per_batch = int(round(fraction * batch_size)) if num_generated else 0
        self.num_real_per_batch = batch_size - self.num_gen_per_batch
        if self.num_real_per_batch > num_real:
            raise InputError(f"batch needs {self.num_real_per_batch} real images but only {num_real} exist")
        if batches_per_epoch is None:
            per = self.num_real_per_batch if self.num_gen_per_batch == 0 else batch_size
            batches_per_epoch = num_real // per if drop_last else math.ceil(num_real / per)
        self.batches_per_epoch = max(1, batches_per_epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, generator: torch.Generator):
        perm = torch.randperm(self.num_real, generator=generator)
        cursor = 0
        for _ in range(self.batches_per_epoch):
            if cursor + self.num_real_per_batch > self.num_real:
                perm, cursor = torch.randperm(self.num_real, generator=generator), 0
            real = perm[cursor:cursor + self.num_real_per_batch]
            cursor += self.num_real_per_batch
            gen = (torch.randint(0, self.num_generated, (self.num_gen_per_batch,), generator=generator)
                   if self.num_gen_per_batch else torch.empty(0, dtype=torch.long))
            yield real, gen


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A CPU tensor bound for a CUDA device is copied from pinned (page-locked)
    memory with ``non_blocking=True``: the host does not wait for the copy, which the stream orders
    before the kernels that read it. Elsewhere a plain ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def shard(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a global batch (equal sizes required)."""
    if world_size == 1:
        return index
    if len(index) % world_size:
        raise InputError(f"global batch of {len(index)} does not split evenly over {world_size} ranks")
    per = len(index) // world_size
    return index[rank * per:(rank + 1) * per]


@dataclass
class Batch:
    """One training batch on the device: images in [0, 1] and labels; partners when asked."""

    x: torch.Tensor
    y: torch.Tensor
    x_pair: torch.Tensor | None = None
    y_pair: torch.Tensor | None = None
    index: torch.Tensor | None = None   # pool index of each image: real i, generated num_real + j


class GeneratedPool:
    """Generated images, NHWC uint8, possibly memory-mapped; rows gathered per batch."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray):
        self.images = images_hwc
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        idx = index.numpy()
        return to_chw_tensor(np.take(self.images, idx, axis=0))


class TrainBatches:
    """Iterate augmented training batches, mixing real and generated images.

    Every random draw (indices, partners, augmentation) is made for the global batch on the
    CPU from a generator seeded by (seed, epoch), identical on all ranks; each rank then keeps
    its slice. So a run resumed at epoch k, or spread over ranks, sees the same images.
    ``partner_labels`` (real pool) and ``generated.labels`` decide the partner's class: pass
    teacher pseudo-labels there for DARWIN-LF. ``partner_sampling``, ``partner_pool`` ('same': a
    partner from its anchor's pool; 'real': always a real image) and ``partner_augment`` (the
    partner's own crop and flip) are the method's settings (DARWIN's [choice]s, docs/choices.md).
    """

    def __init__(self, real: ImageSet, batch_size: int, device: torch.device,
                 generated: GeneratedPool | None = None, fraction: float = 0.0,
                 with_partners: bool = False, augment: bool = True, batches_per_epoch: int | None = None,
                 partner_labels: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                 partner_sampling: str = "uniform_other_class", partner_pool: str = "same",
                 partner_augment: bool = True):
        self.real_images = real.images.to(device)
        self.real_labels = real.labels.to(device)
        self.generated = generated if generated is not None and len(generated) else None
        self.device = device
        self.augment = augment
        self.rank, self.world_size = rank, world_size
        self.sampler = MixedBatchSampler(len(real), len(self.generated) if self.generated else 0, batch_size,
                                         fraction if self.generated else 0.0, batches_per_epoch)
        self.partners_real = self.partners_gen = None
        if partner_pool not in ("same", "real"):
            raise InputError(f"partner_pool must be 'same' or 'real', found {partner_pool!r}")
        self.partner_pool, self.partner_augment = partner_pool, bool(partner_augment)
        if with_partners:
            self.partner_labels_real = torch.as_tensor(
                real.labels if partner_labels is None else partner_labels, dtype=torch.long).cpu()
            self.partners_real = PartnerSampler(self.partner_labels_real, real.num_classes, partner_sampling)
            if self.generated is not None and partner_pool == "same":
                self.partners_gen = PartnerSampler(self.generated.labels, real.num_classes, partner_sampling)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, seed: int, epoch: int):
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
        num_real = len(self.real_labels)
        for real_idx, gen_idx in self.sampler.epoch(gen):
            src = torch.cat([torch.zeros(len(real_idx), dtype=torch.long),
                             torch.ones(len(gen_idx), dtype=torch.long)])
            idx = torch.cat([real_idx, gen_idx])
            # Shuffle within the global batch before it is cut into rank shards: the sampler
            # orders it real-then-generated, and every rank must see the same mix.
            order = torch.randperm(len(idx), generator=gen)
            src, idx = src[order], idx[order]
            aug = crop_flip_params(len(idx), gen) if self.augment else None
            pair = None
            if self.partners_real is not None:
                pair_src, pair = self._partners(src, idx, gen)
                pair_aug = crop_flip_params(len(idx), gen) if self.augment and self.partner_augment else None
            mine = shard(torch.arange(len(idx)), self.rank, self.world_size)
            x, y = self._gather(src[mine], idx[mine], None if aug is None else aug[mine])
            pool_index = to_device(idx[mine] + src[mine] * num_real, self.device)
            if pair is None:
                yield Batch(x, y, index=pool_index)
            else:
                xp, yp = self._gather(pair_src[mine], pair[mine], None if pair_aug is None else pair_aug[mine])
                yield Batch(x, y, xp, yp, index=pool_index)

    def pool_labels(self) -> torch.Tensor:
        """The label of every pool index (real images, then generated ones)."""
        parts = [self.real_labels.cpu()]
        if self.generated is not None:
            parts.append(self.generated.labels)
        return torch.cat(parts)

    def _partners(self, src, idx, gen):
        """(pool, index) of each sample's partner in a global batch: from the sample's own pool
        (``partner_pool: same``) or from the real one (``real``, by the generated file's labels)."""
        pair = torch.empty_like(idx)
        real = src == 0
        if self.partner_pool == "real":
            labels = self.partner_labels_real[idx.clamp(max=len(self.partner_labels_real) - 1)]
            if (~real).any():
                labels = torch.where(real, labels, self.generated.labels[torch.where(real, 0, idx)])
            return torch.zeros_like(src), self.partners_real.sample(labels, gen)
        if real.any():
            pair[real] = self.partners_real.sample(self.partner_labels_real[idx[real]], gen)
        if (~real).any():
            pair[~real] = self.partners_gen.sample(self.generated.labels[idx[~real]], gen)
        return src, pair

    def _gather(self, src, idx, aug):
        """Images and labels of (pool, index) pairs, in the given order, augmented on the device.

        Which rows are real is decided on the CPU (``src``, ``idx`` are CPU tensors) and rows are
        placed by integer positions: no boolean-mask indexing of device tensors, which would wait
        for the GPU (a host synchronisation per batch)."""
        dev = self.device
        real = src == 0
        if bool(real.all()):   # a CPU tensor: no device synchronisation
            idx_dev = to_device(idx, dev)
            x_u8, y = self.real_images[idx_dev], self.real_labels[idx_dev].long()
        else:
            x_u8 = torch.empty((len(idx), *self.real_images.shape[1:]), dtype=torch.uint8, device=dev)
            y = torch.empty(len(idx), dtype=torch.long, device=dev)
            rpos, gpos = real.nonzero().squeeze(1), (~real).nonzero().squeeze(1)
            if len(rpos):
                rows, rpos_dev = to_device(idx[rpos], dev), to_device(rpos, dev)
                x_u8[rpos_dev] = self.real_images[rows]
                y[rpos_dev] = self.real_labels[rows]
            if len(gpos):
                gen_idx, gpos_dev = idx[gpos], to_device(gpos, dev)
                x_u8[gpos_dev] = to_device(self.generated.gather(gen_idx), dev)
                y[gpos_dev] = to_device(self.generated.labels[gen_idx], dev)
        x = to_float(x_u8)
        if aug is not None:
            x = apply_crop_flip(x, aug)
        return x, y
