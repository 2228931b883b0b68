"""prepare_data on machines without network: CIFAR-10/100 read from the python archives
(cifar-10-python.tar.gz / cifar-100-python.tar.gz) or their extracted folders, by torchvision's
dataset classes (download=False). The archives here are small fakes in exactly that format: pickled
batches {'data': uint8 N x 3072 (channel-major rows), 'labels' | 'fine_labels'} and a meta file."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from robustkd.data import CIFAR_LAYOUT, load_torchvision_cifar
from robustkd.errors import InputError

FILES = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "label_names",
                     "labels"),
         "cifar100": (["train"], ["test"], "meta", "fine_label_names", "fine_labels")}


def fake_archive(tmp_path, name, per_file=4, seed=0):
    """The archive, the torchvision-format checksums of its files, and the images (N, 3, 32, 32) and
    labels each split must give."""
    train_files, test_files, meta_name, meta_key, label_key = FILES[name]
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    archive, folder = CIFAR_LAYOUT[name]
    blobs, expected = {}, {"train": ([], []), "test": ([], [])}
    for split, files in (("train", train_files), ("test", test_files)):
        for f in files:
            data = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
            labels = rng.integers(0, num_classes, per_file).tolist()
            blobs[f] = pickle.dumps({"data": data, label_key: labels, "batch_label": f})
            expected[split][0].append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
            expected[split][1].extend(labels)
    classes = [f"class{i}" for i in range(num_classes)]
    blobs[meta_name] = pickle.dumps({meta_key: classes})
    path = tmp_path / archive
    with tarfile.open(path, "w:gz") as tar:
        for f, blob in blobs.items():
            info = tarfile.TarInfo(f"{folder}/{f}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    md5 = {f: hashlib.md5(b).hexdigest() for f, b in blobs.items()}
    checksums = {"train_list": [[f, md5[f]] for f in train_files], "test_list": [[f, md5[f]] for f in test_files],
                 "meta": {"filename": meta_name, "key": meta_key, "md5": md5[meta_name]}}
    splits = {k: (torch.cat(v[0]), torch.tensor(v[1])) for k, v in expected.items()}
    return path, checksums, splits, classes


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_the_archive_and_its_extracted_folder_are_read(tmp_path, name):
    (tmp_path / "a").mkdir()
    path, checksums, splits, classes = fake_archive(tmp_path / "a", name)
    folder = CIFAR_LAYOUT[name][1]
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    for root in (path, path.parent, tmp_path / "x", tmp_path / "x" / folder):
        for train in (True, False):
            data = load_torchvision_cifar(name, root, train=train, download=False, checksums=checksums)
            images, labels = splits["train" if train else "test"]
            assert torch.equal(data.images, images) and torch.equal(data.labels, labels)
            assert data.classes == classes
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # nothing extracted next to it


def test_files_that_are_not_the_published_ones_are_refused_naming_the_file(tmp_path):
    path, _, _, _ = fake_archive(tmp_path, "cifar10")
    with pytest.raises(InputError) as err:
        load_torchvision_cifar("cifar10", path, train=True, download=False)   # torchvision's published sums
    assert "data_batch_1: md5" in str(err.value) and "c99cafc152244af753f735de768cd75f" in str(err.value)


def test_no_local_copy_without_download_says_what_was_expected(tmp_path):
    with pytest.raises(InputError) as err:
        load_torchvision_cifar("cifar100", tmp_path, train=False, download=False)
    assert "cifar-100-python.tar.gz" in str(err.value) and "data.download" in str(err.value)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="not a readable .tar.gz"):
        load_torchvision_cifar("cifar10", tmp_path, train=False, download=False)


def test_the_fingerprint_sees_an_archive_named_directly(tmp_path):
    from stages.fingerprint_data import fingerprint

    path, _, _, _ = fake_archive(tmp_path, "cifar10")
    first = fingerprint(path)
    assert first["files"] == 1 and first["bytes"] == path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0")
    assert fingerprint(path)["sha256"] != first["sha256"]


def test_the_generated_data_fingerprint_sees_a_replaced_file(tmp_path):
    """ingest_ddpm depends on data/ddpm_fingerprint.json: a file of ddpm.files replaced under the
    same name changes the hash, so DVC re-runs the ingestion."""
    import os
    from stages.fingerprint_data import generated_fingerprint

    path = tmp_path / "1m.npz"
    np.savez(path, image=np.zeros((2, 32, 32, 3), np.uint8), label=np.zeros(2, np.int64))
    first = generated_fingerprint("npz", [str(path)], "")
    np.savez(path, image=np.ones((3, 32, 32, 3), np.uint8), label=np.zeros(3, np.int64))
    os.utime(path, ns=(1, 1))
    second = generated_fingerprint("npz", [str(path)], "")
    assert first["files"][str(path)]["sha256"] != second["files"][str(path)]["sha256"]
    assert generated_fingerprint("none", [], "") == {"source": "none"}
    absent = str(tmp_path / "absent.npz")
    assert generated_fingerprint("npz", [absent], "")["files"][absent]["sha256"] == "absent"
