"""Target images for the attack evaluation, offline by default.

* ``photos`` — scikit-image's bundled sample photos (no download: these ship inside the
  scikit-image wheel), centre-cropped to a square and resized with anti-aliasing to
  ``size x size`` (default 32x32, the CIFAR size the attack papers use), RGB. The order is
  fixed (:data:`PHOTO_NAMES`); the ``i``-th photo gets class id ``i % num_classes``
  (astronaut 0, chelsea 1, coffee 2, ... for 10 classes). Grayscale photos are replicated to
  three channels and the RGBA logo is composited on white.
* ``digits`` — scikit-learn's 8x8 handwritten digits (bundled, offline), through
  :func:`dgp_kernels.cases.datasets.load_dataset` (its fixed test split), 1 channel, true labels.
* ``mnist``, ``cifar10``, ``cifar100`` — from a local directory (``root``), through the same
  loader; a clear ``FileNotFoundError`` names the expected files when they are absent.

Selection is deterministic: for the datasets with labels, image ``j`` is the first
not-yet-used test image of class ``(seed + j) % num_classes``, so a small target set covers
distinct classes (what label-inference attacks are measured on); photos are taken in
:data:`PHOTO_NAMES` order starting at position ``seed``.

Every loader returns a :class:`TargetSet`: ``images`` float32 ``[N, C, H, W]`` in ``[0, 1]``,
``labels`` int64 ``[N]``.

Add a source: write a function returning a :class:`TargetSet`, add its name to
``_SOURCES`` (and to ``dgp evaluate --dataset``), and a shape/range test in
``tests/cases/test_targets.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..checks import check_int
from ..optional import require
from . import datasets

__all__ = [
    "PHOTO_NAMES",
    "TargetSet",
    "available_target_sources",
    "load_photos",
    "load_targets",
]

#: scikit-image sample photos that load without network (checked with scikit-image 0.26),
#: colour first; the index in this tuple decides the class id (``index % num_classes``).
PHOTO_NAMES: Tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "immunohistochemistry",
    "colorwheel",
    "retina",
    "logo",
    "hubble_deep_field",
    "camera",
    "coins",
    "moon",
    "clock",
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
)


@dataclass
class TargetSet:
    """The private images a client holds, which the attacks try to rebuild.

    Attributes:
        images: float32 ``[N, C, H, W]`` in ``[0, 1]`` (CPU).
        labels: int64 ``[N]``, each in ``[0, num_classes)``.
        names: ``N`` human-readable ids (``"astronaut"``, ``"digits#17"``, ...).
        num_classes: number of classes of the model that is attacked.
        source: the source name (``"photos"``, ``"digits"``, ...).
    """

    images: Tensor
    labels: Tensor
    names: List[str]
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N={self.images.shape[0]}, got {tuple(self.labels.shape)}"
            )
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"names has {len(self.names)} entries for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


def _check_count(n: object, name: str = "n") -> int:
    return check_int(n, name, min_value=1)


def _check_size(size: object) -> int:
    return check_int(size, "size", min_value=4)


def _import_skimage():
    """``skimage`` with its ``data`` and ``transform`` submodules loaded."""
    require("skimage.data", extra="eval", purpose="the photo targets")
    require("skimage.transform", extra="eval", purpose="the photo targets")
    import skimage

    return skimage


def _photo_array(name: str):
    """The named sample photo as float64 ``[H, W, 3]`` in [0, 1] (numpy)."""
    import numpy as np

    skimage = _import_skimage()
    x = getattr(skimage.data, name)()
    if isinstance(x, tuple):  # stereo_motorcycle -> (left, right, disparity)
        x = x[0]
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.float64)
    elif x.dtype == np.uint8:
        x = x.astype(np.float64) / 255.0
    else:
        x = x.astype(np.float64)
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    if x.ndim == 2:
        x = np.stack([x, x, x], axis=-1)
    if x.shape[-1] == 4:  # RGBA: composite on white
        a = x[..., 3:4]
        x = x[..., :3] * a + (1.0 - a)
    return x


def _square_resize(x, size: int):
    """Centre square crop of ``[H, W, C]`` then anti-aliased resize to ``[size, size, C]``."""
    skimage = _import_skimage()
    h, w = x.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = x[top: top + s, left: left + s]
    out = skimage.transform.resize(crop, (size, size), order=1, anti_aliasing=True,
                                   preserve_range=True)
    return out.clip(0.0, 1.0)


def load_photos(n: int = 1, *, size: int = 32, num_classes: int = 10, start: int = 0) -> TargetSet:
    """``n`` of scikit-image's bundled photos as RGB ``size x size`` targets.

    Photos are taken from :data:`PHOTO_NAMES` in order from position ``start`` (wrapping);
    photo ``PHOTO_NAMES[i]`` has class id ``i % num_classes``.

    Returns:
        a :class:`TargetSet` with ``images`` float32 ``[n, 3, size, size]`` in ``[0, 1]``.

    Raises:
        ValueError: ``n`` larger than the number of photos (19), bad ``size``/``num_classes``.
        ImportError: scikit-image missing (names the ``eval`` extra).
    """
    import numpy as np

    n = _check_count(n)
    size = _check_size(size)
    num_classes = _check_count(num_classes, "num_classes")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if n > len(PHOTO_NAMES):
        raise ValueError(
            f"n={n} photos requested but only {len(PHOTO_NAMES)} bundled photos exist "
            f"({', '.join(PHOTO_NAMES)}); use --dataset digits/cifar10 for more targets"
        )
    picks = [(start + j) % len(PHOTO_NAMES) for j in range(n)]
    arrays = [_square_resize(_photo_array(PHOTO_NAMES[i]), size) for i in picks]
    images = torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([i % num_classes for i in picks], dtype=torch.int64)
    return TargetSet(images=images, labels=labels, names=[PHOTO_NAMES[i] for i in picks],
                     num_classes=num_classes, source="photos")


def _resize_batch(x: Tensor, size: Optional[int]) -> Tensor:
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    size = _check_size(size)
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=size < x.shape[-1])
    return y.clamp_(0.0, 1.0)


def select_by_class(labels: Tensor, n: int, num_classes: int, *, start: int = 0) -> List[int]:
    """Deterministic indices: pick ``j`` is the first unused index of class
    ``(start + j) % num_classes`` (classes without images left are skipped).

    Raises ``ValueError`` when fewer than ``n`` images exist.
    """
    n = _check_count(n)
    if n > labels.numel():
        raise ValueError(f"{n} targets requested but the split has only {labels.numel()} images")
    pools: Dict[int, List[int]] = {}
    for i, c in enumerate(labels.tolist()):
        pools.setdefault(int(c), []).append(i)
    cursor = {c: 0 for c in pools}
    out: List[int] = []
    c = start % num_classes
    while len(out) < n:
        pool = pools.get(c)
        if pool is not None and cursor[c] < len(pool):
            out.append(pool[cursor[c]])
            cursor[c] += 1
        c = (c + 1) % num_classes
    return out


def _load_labelled(source: str, n: int, *, size: Optional[int], root: Optional[str],
                   start: int) -> TargetSet:
    x, y = datasets.load_dataset(source, root=root, split="test")
    info = datasets.dataset_info(source)
    num_classes = int(info["num_classes"])
    idx = select_by_class(y, n, num_classes, start=start)
    images = _resize_batch(x[idx].to(torch.float32), size).contiguous()
    return TargetSet(images=images, labels=y[idx].to(torch.int64).clone(),
                     names=[f"{source}#{i}" for i in idx], num_classes=num_classes, source=source)


def _photos(n: int, *, size: Optional[int], root: Optional[str], start: int,
            num_classes: int) -> TargetSet:
    del root  # photos are bundled
    return load_photos(n, size=32 if size is None else size, num_classes=num_classes, start=start)


def _labelled(source: str) -> Callable[..., TargetSet]:
    def load(n: int, *, size: Optional[int], root: Optional[str], start: int,
             num_classes: int) -> TargetSet:
        del num_classes  # fixed by the dataset
        return _load_labelled(source, n, size=size, root=root, start=start)

    return load


_SOURCES: Dict[str, Callable[..., TargetSet]] = {
    "photos": _photos,
    "digits": _labelled("digits"),
    "mnist": _labelled("mnist"),
    "cifar10": _labelled("cifar10"),
    "cifar100": _labelled("cifar100"),
}


def available_target_sources() -> List[str]:
    """Names accepted by :func:`load_targets`."""
    return list(_SOURCES)


def load_targets(source: str = "photos", n: int = 1, *, size: Optional[int] = None,
                 root: Optional[str] = None, seed: int = 0, num_classes: int = 10) -> TargetSet:
    """``n`` target images from ``source`` (see the module docstring), deterministic in ``seed``.

    Args:
        source: ``"photos"`` (default), ``"digits"``, ``"mnist"``, ``"cifar10"``, ``"cifar100"``.
        n: number of images.
        size: square side to resize to; default 32 for photos and the dataset's own size
            otherwise (digits 8, MNIST 28, CIFAR 32).
        root: directory of the MNIST/CIFAR files (unused for photos and digits).
        seed: start position of the deterministic selection (photo index / first class).
        num_classes: classes of the attacked model for photos (datasets bring their own).

    Returns:
        a :class:`TargetSet` with float32 ``[n, C, H, W]`` images in ``[0, 1]``.
    """
    if not isinstance(source, str) or source not in _SOURCES:
        raise ValueError(
            f"unknown target source {source!r}; known sources: {', '.join(_SOURCES)}"
        )
    n = _check_count(n)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return _SOURCES[source](n, size=size, root=root, start=seed, num_classes=num_classes)
