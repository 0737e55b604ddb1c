"""Datasets for the simulator, offline, and their partition across clients.

* ``digits`` — scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no
  download), with a fixed seeded 80/20 train/test split (seed 0, stratified by class, so it
  does not change with the run's seed). Needs ``pip install "dgp_kernels[eval]"``.
* ``mnist`` — the idx files (``train-images-idx3-ubyte[.gz]`` ...) from ``root``,
  ``root/MNIST/raw`` or ``root/mnist``.
* ``cifar10`` / ``cifar100`` — the python pickled batches (``cifar-10-batches-py/
  data_batch_1..5, test_batch``; ``cifar-100-python/train, test``) from ``root`` or that
  sub-folder.

torchvision's dataset classes are used when torchvision imports (it does not beside the
CPU torch 2.13 build: "operator torchvision::nms does not exist"); otherwise the same files are read directly here.
Nothing is ever downloaded: missing files raise ``FileNotFoundError`` naming them.

Every loader returns ``x`` float32 ``[N, C, H, W]`` in ``[0, 1]`` and ``y`` int64 ``[N]``.

Add a dataset: a ``_load_<name>(root, split)`` returning that pair, an entry in
``_INFO`` and ``_LOADERS``, and a reader test on tiny files in ``tests/cases/test_datasets.py``.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..optional import require

__all__ = [
    "available_datasets",
    "dataset_info",
    "dirichlet_split",
    "iid_split",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
]

_INFO: Dict[str, Dict[str, int]] = {
    "digits": dict(num_classes=10, channels=1, image_size=8),
    "mnist": dict(num_classes=10, channels=1, image_size=28),
    "cifar10": dict(num_classes=10, channels=3, image_size=32),
    "cifar100": dict(num_classes=100, channels=3, image_size=32),
}

SPLITS = ("train", "test")
#: Fraction of ``digits`` held out for testing, and the fixed seed of that split.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def available_datasets() -> List[str]:
    """Names :func:`load_dataset` accepts."""
    return sorted(_INFO)


def dataset_info(name: str) -> Dict[str, int]:
    """``dict(num_classes=, channels=, image_size=)`` of a dataset (no data is read)."""
    if name not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}")
    return dict(_INFO[name])


def load_dataset(name: str, root: Optional[str] = None, split: str = "train") -> Tuple[Tensor, Tensor]:
    """Load a whole split: ``x`` float32 ``[N, C, H, W]`` in ``[0, 1]``, ``y`` int64 ``[N]``.

    Args:
        name: one of :func:`available_datasets`.
        root: directory of the MNIST/CIFAR files (required for those; ignored for digits).
        split: ``"train"`` or ``"test"``.

    Raises:
        ValueError: unknown ``name`` or ``split``; ``FileNotFoundError`` when the files are
        not under ``root`` (the message lists where they were looked for);
        ``ImportError`` naming the ``eval`` extra when scikit-learn is missing (digits).
    """
    dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name != "digits":
        if root is None:
            raise FileNotFoundError(
                f"dataset {name!r} is read from local files and needs root= (--data-root): a "
                f"directory holding {_EXPECTED[name]}; nothing is downloaded. The built-in "
                "'digits' dataset needs no files."
            )
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        root = os.fspath(root)
    x, y = _LOADERS[name](root, split)
    return x.contiguous(), y.contiguous()


# --------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797, 64] in [0, 16], labels int64), read once per process."""
    sk_datasets = require("sklearn.datasets", extra="eval", purpose="the built-in 'digits' dataset")
    bunch = sk_datasets.load_digits()
    return np.asarray(bunch.data, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def _load_digits(root: Optional[str], split: str) -> Tuple[Tensor, Tensor]:
    data, target = _digits_arrays()
    x = torch.from_numpy(data.reshape(-1, 1, 8, 8) / 16.0)  # a new array: callers may mutate
    y = torch.from_numpy(target.copy())
    # Fixed stratified split: per class, a seeded permutation; the first 20% go to test.
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_idx: List[np.ndarray] = []
    train_idx: List[np.ndarray] = []
    ys = y.numpy()
    for c in range(10):
        idx = np.flatnonzero(ys == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(idx.size * DIGITS_TEST_FRACTION))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    sel = np.sort(np.concatenate(train_idx if split == "train" else test_idx))
    sel_t = torch.from_numpy(sel)
    return x[sel_t].clamp_(0.0, 1.0), y[sel_t]


# --------------------------------------------------------------------------------------
# torchvision, when it imports
# --------------------------------------------------------------------------------------
def _torchvision():
    """The torchvision module, or None when it is absent or does not import (it fails with
    "operator torchvision::nms does not exist" beside torch 2.13.0+cpu)."""
    try:
        import torchvision  # noqa: F401

        return torchvision
    except Exception:  # any import-time failure means "not usable"
        return None


def _from_torchvision(name: str, root: str, split: str) -> Optional[Tuple[Tensor, Tensor]]:
    tv = _torchvision()
    if tv is None:
        return None
    cls = {"mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name]
    try:
        ds = getattr(tv.datasets, cls)(root, train=(split == "train"), download=False)
    except (RuntimeError, FileNotFoundError, OSError):
        return None  # not in torchvision's layout: fall back to our readers
    data = ds.data
    data = data if isinstance(data, Tensor) else torch.from_numpy(np.asarray(data))
    targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if data.dim() == 3:  # MNIST [N, H, W]
        x = data.unsqueeze(1)
    else:  # CIFAR [N, H, W, C]
        x = data.permute(0, 3, 1, 2)
    return x.to(torch.float32).div_(255.0), targets


# --------------------------------------------------------------------------------------
# MNIST idx files
# --------------------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_EXPECTED = {
    "mnist": "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
             "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] (in it, in MNIST/raw/ "
             "or in mnist/)",
    "cifar10": "cifar-10-batches-py/data_batch_1..5 and test_batch (or those files directly)",
    "cifar100": "cifar-100-python/train and test (or those files directly)",
}


def read_idx(path: str) -> np.ndarray:
    """Read one idx file (the MNIST format; gzip when the name ends in ``.gz``).

    Layout: 2 zero bytes, a type byte (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), a byte with the number of dimensions, one big-endian u32 per
    dimension, then the data in row-major order. Raises ``ValueError`` naming the file
    for a bad header or a length that does not match the dimensions.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: idx header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - head != count * dtype.itemsize:
        raise ValueError(
            f"{path}: idx dimensions {dims} need {count * dtype.itemsize} data bytes, file has "
            f"{len(raw) - head}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=head, count=count).reshape(dims)


def _find(root: str, dirs: Sequence[str], names: Sequence[str]) -> Optional[str]:
    for d in dirs:
        for n in names:
            p = os.path.join(root, d, n)
            if os.path.isfile(p):
                return p
    return None


def _load_mnist(root: str, split: str) -> Tuple[Tensor, Tensor]:
    tv = _from_torchvision("mnist", root, split)
    if tv is not None:
        return tv
    dirs = ("", os.path.join("MNIST", "raw"), "mnist", "MNIST")
    paths = []
    for stem in _MNIST_FILES[split]:
        p = _find(root, dirs, (stem, stem + ".gz"))
        if p is None:
            raise FileNotFoundError(
                f"MNIST {split} file {stem}[.gz] not found under {root!r} (looked in "
                f"{', '.join(repr(os.path.join(root, d)) for d in dirs)}); expected "
                f"{_EXPECTED['mnist']}"
            )
        paths.append(p)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST files disagree: images {images.shape} ({paths[0]}), labels {labels.shape} ({paths[1]})"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------
def read_cifar_batch(path: str, label_key: str = "labels") -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch (a pickled dict with ``b"data"``: uint8 ``[N, 3072]``,
    channel-major 32x32 planes, and ``b"labels"`` / ``b"fine_labels"``).

    Returns ``(images uint8 [N, 3, 32, 32], labels int64 [N])``. Raises ``ValueError``
    naming the file when a key is missing or the sizes disagree.
    """
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR batch (unpickled a {type(d).__name__})")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: CIFAR batch lacks 'data' or {label_key!r} (keys {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: CIFAR data {data.shape} and labels {labels.shape} do not match [N, 3072] / [N]"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(root: str, split: str, *, hundred: bool) -> Tuple[Tensor, Tensor]:
    name = "cifar100" if hundred else "cifar10"
    tv = _from_torchvision(name, root, split)
    if tv is not None:
        return tv
    sub = "cifar-100-python" if hundred else "cifar-10-batches-py"
    if hundred:
        files, key = (["train"] if split == "train" else ["test"]), "fine_labels"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    paths = []
    for fname in files:
        p = _find(root, (sub, ""), (fname,))
        if p is None:
            raise FileNotFoundError(
                f"{name} {split} file {fname!r} not found in {os.path.join(root, sub)!r} or "
                f"{root!r}; expected {_EXPECTED[name]}"
            )
        paths.append(p)
    parts = [read_cifar_batch(p, key) for p in paths]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return x, y


_LOADERS: Dict[str, Callable[[Optional[str], str], Tuple[Tensor, Tensor]]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": lambda root, split: _load_cifar(root, split, hundred=False),
    "cifar100": lambda root, split: _load_cifar(root, split, hundred=True),
}


# --------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------
def iid_split(n: int, clients: int, seed: int) -> List[Tensor]:
    """A seeded random permutation of ``range(n)`` cut into ``clients`` near-equal shards
    (int64 index tensors, each sorted). Raises ``ValueError`` when ``n < clients``."""
    if n < clients:
        raise ValueError(f"cannot split {n} samples among {clients} clients (fewer samples than clients)")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    return [s.sort().values for s in torch.tensor_split(perm, clients)]


def dirichlet_split(labels: Tensor, clients: int, alpha: float, seed: int, *,
                    min_size: int = 1, max_tries: int = 1000) -> List[Tensor]:
    """Label-skewed non-IID partition (Hsu et al. 2019): for each class, the proportions of
    its samples going to each client are drawn from Dirichlet(alpha); redrawn until every
    client has at least ``min_size`` samples.

    Args:
        labels: int64 ``[N]`` class labels.
        clients, alpha, seed: number of clients, concentration (> 0), seed.

    Returns:
        one sorted int64 index tensor per client; together a partition of ``range(N)``.
    """
    if not (alpha > 0):
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    n = int(labels.numel())
    if n < clients * min_size:
        raise ValueError(f"cannot give {clients} clients {min_size} samples each from {n} samples")
    rng = np.random.default_rng(int(seed))
    ys = labels.cpu().numpy()
    classes = np.unique(ys)
    for _ in range(max_tries):
        shards: List[List[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = np.flatnonzero(ys == c)
            idx = idx[rng.permutation(idx.size)]
            p = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
        sizes = [sum(a.size for a in s) for s in shards]
        if min(sizes) >= min_size:
            return [torch.from_numpy(np.sort(np.concatenate(s)).astype(np.int64)) for s in shards]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {clients} clients at least "
        f"{min_size} samples in {max_tries} draws; raise alpha or lower clients"
    )
