"""Metrics: known values on fixed inputs, SSIM against scikit-image's Gaussian variant,
floor PSNR, label accuracy, order matching, optional LPIPS and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch

from dgp_kernels.attacks import metrics as M


def _pair(seed: int = 0, shape=(2, 3, 16, 16), noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    y = (x + noise * torch.randn(shape, generator=g)).clamp(0, 1)
    return x, y


def test_mse_and_psnr_of_known_error():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.1)
    y[1] = 0.01
    assert M.mse(x, y).tolist() == pytest.approx([0.01, 1e-4])
    assert M.psnr(x, y).tolist() == pytest.approx([20.0, 40.0])
    assert M.psnr(x, y, data_range=255.0)[0].item() == pytest.approx(20 * math.log10(255 / 0.1))
    assert M.psnr(x, x).tolist() == [math.inf, math.inf]


def test_ssim_of_identical_images_is_one():
    x, _ = _pair()
    assert M.ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    small = torch.rand(1, 3, 8, 8)  # smaller than the 11x11 window
    assert M.ssim(small, small).item() == pytest.approx(1.0)
    assert M.ssim(small, 1 - small).item() < 0.5


@pytest.mark.parametrize("seed, noise", [(0, 0.05), (1, 0.2), (2, 0.5)])
def test_ssim_matches_skimage_gaussian_variant(seed, noise):
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair(seed, (2, 3, 24, 20), noise)
    ours = M.ssim(x, y)
    for i in range(2):
        ref = skm.structural_similarity(
            x[i].double().numpy(),
            y[i].double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)


def test_ssim_decreases_with_noise():
    x, _ = _pair(3)
    values = [M.ssim(x, _pair(3, noise=n)[1]).mean().item() for n in (0.01, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]


def test_floor_psnr_is_the_flat_mean_colour_image():
    x, _ = _pair(4)
    flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    assert M.floor_psnr(x).tolist() == pytest.approx(M.psnr(flat, x).tolist())
    # any other flat colour scores lower than the per-channel mean
    assert (M.psnr(torch.full_like(x, 0.5), x) <= M.floor_psnr(x) + 1e-9).all()
    assert M.floor_psnr(torch.full((1, 3, 4, 4), 0.3)).item() == math.inf


def test_label_accuracy():
    pred = torch.tensor([1, 2, 2, 0])
    true = torch.tensor([2, 1, 2, 3])
    assert M.label_accuracy(pred, true) == 0.25
    assert M.label_accuracy(pred, true, ordered=False) == 0.75  # {1, 2, 2} shared
    assert M.label_accuracy(true, true) == 1.0


def test_match_order_undoes_a_permutation():
    x, _ = _pair(5, (5, 3, 8, 8))
    perm = torch.tensor([3, 0, 4, 1, 2])
    rec = x[perm] + 0.01
    found = M.match_order(rec, x)
    assert torch.equal(rec[found], x + 0.01)


def test_lpips_is_optional():
    x, y = _pair()
    out = M.lpips_distance(x, y)
    if out is None:
        return  # the lpips package or its weights are not on this machine: documented
    assert out.shape == (2,) and bool((out >= 0).all())


@pytest.mark.parametrize("fn", [M.mse, M.psnr, M.ssim])
def test_bad_inputs(fn):
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        fn(x, torch.rand(2, 3, 8, 7))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fn(x[0], x[0])
    with pytest.raises(TypeError, match="floating"):
        fn(x, (x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(x, x.numpy())


def test_bad_data_range_and_labels():
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="data_range"):
        M.psnr(x, x, data_range=0)
    with pytest.raises(ValueError, match="same shape"):
        M.label_accuracy(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="integer"):
        M.label_accuracy(torch.tensor([1.0]), torch.tensor([1]))


def test_gray_floor_is_the_psnr_of_mid_gray():
    from dgp_kernels.attacks import metrics as M

    black = torch.zeros(1, 3, 4, 4)
    assert float(M.gray_floor_psnr(black)[0]) == pytest.approx(10 * math.log10(1 / 0.25), abs=1e-9)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # the mean colour is information: its floor is never below the gray one
    assert bool((M.floor_psnr(x) >= M.gray_floor_psnr(x) - 1e-9).all())
