"""Fixtures for the attack tests: a tiny sigmoid LeNet (8x8 RGB, 4 classes) and smooth
8x8 images, so every optimisation attack converges in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.cases.models import lenet_sigmoid


def smooth_images(n: int, seed: int, size: int = 8, channels: int = 3) -> torch.Tensor:
    """``n`` smooth images ``[n, channels, size, size]`` in [0, 1] (bilinear upsampling of
    coarse noise; closer to photos than white noise, and not flat)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 2, size // 2, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return up.clamp(0, 1)


@pytest.fixture
def tiny_lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return lenet_sigmoid(num_classes=4, channels=3, image_size=8)
