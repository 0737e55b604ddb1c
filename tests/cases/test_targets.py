"""Target images: offline, float32 [N, C, H, W] in [0, 1], deterministic, documented labels."""

import pytest
import torch

from dgp_kernels.cases.targets import (
    PHOTO_NAMES,
    TargetSet,
    available_target_sources,
    load_photos,
    load_targets,
    select_by_class,
)


def _check_images(t: TargetSet, n: int, c: int, size: int) -> None:
    assert t.images.shape == (n, c, size, size)
    assert t.images.dtype == torch.float32
    assert float(t.images.min()) >= 0.0 and float(t.images.max()) <= 1.0
    assert t.labels.dtype == torch.int64 and t.labels.shape == (n,)
    assert len(t.names) == n
    assert t.image_shape == (c, size, size)
    # real pictures, not constant fills
    assert all(float(img.std()) > 0.02 for img in t.images)


def test_photos_shape_range_labels_and_determinism():
    t = load_photos(3, size=16)
    _check_images(t, 3, 3, 16)
    assert t.names == list(PHOTO_NAMES[:3])
    assert t.labels.tolist() == [0, 1, 2]  # class id = position in PHOTO_NAMES % num_classes
    again = load_targets("photos", 3, size=16)
    assert torch.equal(again.images, t.images)
    assert t.source == "photos" and t.num_classes == 10


def test_photos_default_size_is_32_and_labels_wrap():
    t = load_targets("photos", 2, seed=len(PHOTO_NAMES) - 1, num_classes=4)
    _check_images(t, 2, 3, 32)
    last = len(PHOTO_NAMES) - 1
    assert t.names == [PHOTO_NAMES[last], PHOTO_NAMES[0]]  # start wraps around the list
    assert t.labels.tolist() == [last % 4, 0]


def test_grayscale_photo_is_replicated_to_rgb():
    i = PHOTO_NAMES.index("camera")
    t = load_photos(1, size=8, start=i)
    img = t.images[0]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_photos_bad_arguments():
    with pytest.raises(ValueError, match="only 19 bundled photos"):
        load_photos(len(PHOTO_NAMES) + 1)
    with pytest.raises(ValueError, match="size"):
        load_photos(1, size=2)
    with pytest.raises(TypeError, match="n must be an int"):
        load_photos(1.5)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        load_photos(0)


def test_digits_distinct_classes_offline():
    t = load_targets("digits", 10)
    _check_images(t, 10, 1, 8)
    assert sorted(t.labels.tolist()) == list(range(10))  # one image per class, deterministic
    assert torch.equal(load_targets("digits", 10).images, t.images)
    big = load_targets("digits", 2, size=16, seed=3)
    _check_images(big, 2, 1, 16)
    assert big.labels.tolist() == [3, 4]


def test_unknown_source_and_missing_files():
    with pytest.raises(ValueError, match="unknown target source 'svhn'"):
        load_targets("svhn", 1)
    with pytest.raises(FileNotFoundError):
        load_targets("cifar10", 1, root="/nonexistent-dir-for-dgp-tests")
    assert set(available_target_sources()) >= {"photos", "digits", "mnist", "cifar10", "cifar100"}


def test_select_by_class_rule():
    labels = torch.tensor([1, 1, 0, 2, 0, 1])
    # pick j takes the first unused image of class (start + j) % 3
    assert select_by_class(labels, 4, 3) == [2, 0, 3, 4]
    assert select_by_class(labels, 3, 3, start=1) == [0, 3, 2]
    with pytest.raises(ValueError, match="only 6 images"):
        select_by_class(labels, 7, 3)


def test_targetset_checks_shapes():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        TargetSet(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.int64), ["a"] * 3, 10, "x")
    with pytest.raises(ValueError, match="labels"):
        TargetSet(torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.int64), ["a"] * 2, 10, "x")
