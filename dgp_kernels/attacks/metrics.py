"""Image-reconstruction metrics, per image, on ``[B, C, H, W]`` tensors in ``[0, data_range]``.

* :func:`mse`, :func:`psnr` — mean over C, H, W; PSNR ``10 log10(data_range^2 / mse)``
  (``inf`` for identical images).
* :func:`ssim` — Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``,
  ``K2 = 0.03``, population (not sample) covariances, statistics over the *valid* region only
  (no padding), averaged over pixels and then over channels. This is the variant of
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=0)``, which crops the filter border
  before averaging. Images smaller than 11 pixels use the largest odd window that fits
  (same sigma).
* :func:`floor_psnr` — PSNR of the flat per-channel mean-colour image of each target: what
  an attack scores without learning anything about the image. Report leakage above it.
* :func:`label_accuracy`, :func:`match_order` (pair reconstructions with targets when a
  batch attack returns them in another order), :func:`lpips_distance` (optional).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["mse", "psnr", "ssim", "floor_psnr", "gray_floor_psnr", "label_accuracy", "match_order", "lpips_distance"]


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _check_range(data_range: float) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)):
        raise TypeError(f"data_range must be a number, got {type(data_range).__name__}")
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be finite and > 0, got {data_range!r}")
    return float(data_range)


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image: float64 ``[B]``."""
    _check_pair(x, y)
    return (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: float64 ``[B]`` (``inf`` where equal)."""
    r = _check_range(data_range)
    m = mse(x, y)
    return 10.0 * torch.log10(torch.as_tensor(r * r, dtype=torch.float64) / m)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    w = torch.exp(-(coords**2) / (2 * sigma * sigma))
    return w / w.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, *, win_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image (Gaussian variant; see the module docstring):
    float64 ``[B]`` in ``[-1, 1]``, 1 for identical images."""
    _check_pair(x, y)
    r = _check_range(data_range)
    if not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd positive int, got {win_size!r}")
    b, c, h, w = x.shape
    size = min(win_size, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError(f"images must be at least 1x1, got {h}x{w}")
    g = _gaussian_window(size, sigma, x.device)
    kernel = torch.outer(g, g).expand(c, 1, size, size).contiguous()
    xd = x.double()
    yd = y.double()

    def filt(t: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=c)  # valid region only

    mu_x, mu_y = filt(xd), filt(yd)
    vx = filt(xd * xd) - mu_x * mu_x
    vy = filt(yd * yd) - mu_y * mu_y
    cxy = filt(xd * yd) - mu_x * mu_y
    c1 = (0.01 * r) ** 2
    c2 = (0.03 * r) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)


def floor_psnr(target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR of each target's flat per-channel mean-colour image: float64 ``[B]``."""
    _check_pair(target, target)
    flat = target.double().mean(dim=(2, 3), keepdim=True).expand_as(target)
    return psnr(flat, target, data_range)


def gray_floor_psnr(target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR of a flat mid-gray image (every pixel ``data_range / 2``) against each target:
    float64 ``[B]``. What an attacker that knows nothing about the image scores; lower than
    :func:`floor_psnr` for most photos (the mean colour is information)."""
    _check_pair(target, target)
    gray = torch.full_like(target, 0.5 * data_range, dtype=torch.float64)
    return psnr(gray, target, data_range)


def label_accuracy(pred: Tensor, true: Tensor, *, ordered: bool = True) -> float:
    """Fraction of labels recovered. ``ordered=True`` compares position by position;
    ``ordered=False`` compares the label multisets (the order of a batch attack's output is
    arbitrary): ``sum_c min(count_pred(c), count_true(c)) / B``."""
    for name, t in (("pred", pred), ("true", true)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
    n = true.numel()
    if n == 0:
        raise ValueError("label_accuracy needs at least one label")
    p, t = pred.cpu().long(), true.cpu().long()
    if ordered:
        return float((p == t).double().mean())
    size = int(max(p.max(), t.max())) + 1
    if int(min(p.min(), t.min())) < 0:
        raise ValueError("labels must be non-negative")
    return float(torch.minimum(torch.bincount(p, minlength=size), torch.bincount(t, minlength=size)).sum()) / n


def match_order(rec: Tensor, target: Tensor) -> Tensor:
    """Permutation ``perm`` (int64 ``[B]``) such that ``rec[perm]`` is paired with ``target``
    to maximise the total PSNR: exact (Hungarian via scipy, or brute force for B <= 7), else
    greedy by best pair."""
    _check_pair(rec, target)
    b = rec.shape[0]
    err = (rec.double().flatten(1)[None, :, :] - target.double().flatten(1)[:, None, :]).pow(2).mean(-1)
    score = -10 * torch.log10(err.clamp_min(1e-30))  # score[i, j]: target i vs rec j (PSNR, dB)
    try:
        from scipy.optimize import linear_sum_assignment  # optional, comes with scikit-learn

        rows, cols = linear_sum_assignment(-score.cpu().numpy())
        perm = torch.empty(b, dtype=torch.int64)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
        return perm.to(rec.device)
    except ImportError:
        pass
    if b <= 7:
        best = max(itertools.permutations(range(b)), key=lambda p: float(score[torch.arange(b), list(p)].sum()))
        return torch.tensor(best, dtype=torch.int64, device=rec.device)
    perm = torch.full((b,), -1, dtype=torch.int64)
    s = score.clone()
    for _ in range(b):
        i, j = divmod(int(torch.argmax(s)), b)
        perm[i] = j
        s[i, :] = -math.inf
        s[:, j] = -math.inf
    return perm.to(rec.device)


_LPIPS_MODEL = None


def _alexnet_checkpoint_present() -> bool:
    hub = torch.hub.get_dir()
    folder = os.path.join(hub, "checkpoints")
    return os.path.isdir(folder) and any(f.startswith("alexnet") for f in os.listdir(folder))


def lpips_distance(x: Tensor, y: Tensor) -> Optional[Tensor]:
    """LPIPS (Zhang et al. 2018, AlexNet backbone) per image: float32 ``[B]``, or ``None`` when
    the ``lpips`` package, torchvision or the pretrained AlexNet weights are not already on this
    machine. Never downloads anything; never raises for a missing package or weight file."""
    _check_pair(x, y)
    global _LPIPS_MODEL
    if _LPIPS_MODEL is None:
        try:
            import lpips  # noqa: F401  (optional)
            import torchvision  # noqa: F401  (lpips needs it for the backbone)
        except Exception:
            return None
        if not _alexnet_checkpoint_present():
            return None
        try:
            _LPIPS_MODEL = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception:
            return None
    model = _LPIPS_MODEL.to(x.device)
    with torch.no_grad():
        out = model(x.float() * 2 - 1, y.float() * 2 - 1)  # lpips expects [-1, 1]
    return out.flatten().float()
