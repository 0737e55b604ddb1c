"""Offline datasets: the built-in digits split, the MNIST idx / CIFAR pickle readers on tiny
files written here in the real formats, clear errors when files are absent, the partitions."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from dgp_kernels.cases import datasets as simdata
from dgp_kernels.cases.datasets import (
    available_datasets,
    dataset_info,
    dirichlet_split,
    iid_split,
    load_dataset,
    read_cifar_batch,
    read_idx,
)


@pytest.fixture(autouse=True)
def _no_torchvision(monkeypatch):
    # Exercise our own readers even on a machine where torchvision imports.
    monkeypatch.setattr(simdata, "_torchvision", lambda: None)


def test_available_and_info():
    assert available_datasets() == ["cifar10", "cifar100", "digits", "mnist"]
    assert dataset_info("digits") == dict(num_classes=10, channels=1, image_size=8)
    assert dataset_info("cifar100")["num_classes"] == 100
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10"):
        dataset_info("svhn")


def test_digits_fixed_split():
    xtr, ytr = load_dataset("digits")
    xte, yte = load_dataset("digits", split="test")
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert xtr.shape[0] + xte.shape[0] == 1797
    assert abs(xte.shape[0] / 1797 - 0.2) < 0.01
    assert float(xtr.min()) >= 0.0 and float(xtr.max()) == 1.0
    assert sorted(ytr.unique().tolist()) == list(range(10)) == sorted(yte.unique().tolist())
    # Stratified: every class holds ~20% of its samples out.
    for c in range(10):
        n_te, n_tr = int((yte == c).sum()), int((ytr == c).sum())
        assert abs(n_te / (n_te + n_tr) - 0.2) < 0.02
    # Train and test are disjoint images of the bundled set, and the split is fixed.
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    keys = lambda x: {tuple(r) for r in x.reshape(x.shape[0], -1).tolist()}  # noqa: E731
    assert keys(xtr) | keys(xte) == keys(raw)
    x2, y2 = load_dataset("digits")
    assert torch.equal(x2, xtr) and torch.equal(y2, ytr)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_dataset("digits", split="val")


# --------------------------------------------------------------------------------------
# MNIST idx
# --------------------------------------------------------------------------------------
def _write_idx(path, arr: np.ndarray, gz: bool):
    type_byte = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _fake_mnist(root, gz: bool, sub=os.path.join("MNIST", "raw")):
    d = os.path.join(root, sub)
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, (img, lab), n in (("train", simdata._MNIST_FILES["train"], 7),
                                 ("test", simdata._MNIST_FILES["test"], 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        ext = ".gz" if gz else ""
        _write_idx(os.path.join(d, img + ext), images, gz)
        _write_idx(os.path.join(d, lab + ext), labels, gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_reader(tmp_path, gz):
    truth = _fake_mnist(str(tmp_path), gz)
    for split in ("train", "test"):
        x, y = load_dataset("mnist", str(tmp_path), split)
        images, labels = truth[split]
        assert x.shape == (images.shape[0], 1, 28, 28) and x.dtype == torch.float32
        assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_mnist_flat_folder(tmp_path):
    _fake_mnist(str(tmp_path), gz=False, sub="")
    x, _ = load_dataset("mnist", str(tmp_path), "test")
    assert x.shape[0] == 3


def test_read_idx_other_types_and_errors(tmp_path):
    p = str(tmp_path / "ints-idx2")
    arr = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    _write_idx(p, arr, gz=False)
    assert np.array_equal(read_idx(p), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00")
    with pytest.raises(ValueError, match=r"need 5 data bytes, file has 2"):
        read_idx(str(short))


def test_mnist_missing_files_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="needs root="):
        load_dataset("mnist")


# --------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------
def _write_batch(path, n, label_key, seed, num_classes):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=(n,)).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", label_key.encode(): labels, b"data": data}, f)
    return data, labels


def test_cifar10_reader(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    parts = [_write_batch(d / f"data_batch_{i}", 2 + i, "labels", i, 10) for i in range(1, 6)]
    test = _write_batch(d / "test_batch", 4, "labels", 9, 10)
    x, y = load_dataset("cifar10", str(tmp_path), "train")
    assert x.shape == (sum(2 + i for i in range(1, 6)), 3, 32, 32)
    # Channel-major planes: byte 1024*c + 32*h + w is pixel (c, h, w).
    first = torch.from_numpy(parts[0][0][0]).reshape(3, 32, 32).float() / 255
    assert torch.equal(x[0], first)
    assert y.tolist() == sum((p[1] for p in parts), [])
    xt, yt = load_dataset("cifar10", str(tmp_path), "test")
    assert xt.shape[0] == 4 and yt.tolist() == test[1]
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0


def test_cifar100_reader_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    _, labels = _write_batch(d / "train", 5, "fine_labels", 0, 100)
    x, y = load_dataset("cifar100", str(tmp_path), "train")
    assert x.shape == (5, 3, 32, 32) and y.tolist() == labels
    with pytest.raises(FileNotFoundError, match="cifar100 test file 'test'"):
        load_dataset("cifar100", str(tmp_path), "test")


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", str(tmp_path))
    p = tmp_path / "broken"
    with open(p, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="do not match"):
        read_cifar_batch(str(p))
    with open(p, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="lacks 'data' or 'labels'"):
        read_cifar_batch(str(p))


# --------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------
def _is_partition(shards, n):
    allidx = torch.cat(shards)
    return allidx.numel() == n and torch.equal(allidx.sort().values, torch.arange(n))


def test_iid_split():
    shards = iid_split(103, 10, seed=3)
    assert _is_partition(shards, 103)
    assert {s.numel() for s in shards} == {10, 11}
    assert all(torch.equal(a, b) for a, b in zip(shards, iid_split(103, 10, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(shards, iid_split(103, 10, seed=4)))
    with pytest.raises(ValueError, match="fewer samples than clients"):
        iid_split(3, 10, seed=0)


def test_dirichlet_split_skews_labels():
    labels = torch.arange(10).repeat(100)  # 1000 samples, 100 per class
    skewed = dirichlet_split(labels, 10, alpha=0.1, seed=0)
    flat = dirichlet_split(labels, 10, alpha=1000.0, seed=0)
    assert _is_partition(skewed, 1000) and _is_partition(flat, 1000)
    assert all(s.numel() >= 1 for s in skewed)

    def mean_max_share(shards):  # share of a client's samples in its most common class
        return float(np.mean([torch.bincount(labels[s], minlength=10).max().item() / s.numel()
                              for s in shards]))

    assert mean_max_share(skewed) > 0.5 > 0.2 > mean_max_share(flat)
    again = dirichlet_split(labels, 10, alpha=0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(skewed, again))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_split(labels, 10, alpha=0.0, seed=0)


def test_torchvision_path_when_it_imports(monkeypatch, tmp_path):
    """When torchvision imports, its dataset classes are used (HWC uint8 -> CHW float)."""
    import types

    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.data, self.targets = hwc, [1, 2, 3]

    class Missing:
        def __init__(self, *a, **k):
            raise RuntimeError("Dataset not found")

    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR10=FakeCIFAR10, MNIST=Missing))
    monkeypatch.setattr(simdata, "_torchvision", lambda: fake)
    x, y = load_dataset("cifar10", str(tmp_path), "test")
    assert calls == [(str(tmp_path), False, False)]  # never downloads
    assert torch.equal(x, torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == [1, 2, 3]
    # torchvision cannot find the files: our readers run and name what is missing.
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))
