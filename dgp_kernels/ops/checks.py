"""Argument checks and band counts shared by the wrappers, the reference and fake kernels.

Checks run once, at the boundary, and raise ``ValueError``/``TypeError`` naming the argument,
its value and what is allowed. The C++ kernels repeat them with ``TORCH_CHECK`` (same
wording) because ``torch.ops.dgp.*`` can be called directly.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from ..checks import FRACTION_SUM_TOL, check_fractions  # noqa: F401  (one wording for every layer)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DEFAULT_TOP = 0.05
DEFAULT_KEEP = 0.20
# Absorbs binary representation error in the counts: floor(0.3 * 10) would be 2.
COUNT_EPS = 1e-6


def band_counts(n: int, top: float, keep: float) -> Tuple[int, int]:
    """``(k_top, k_keep)`` for a tensor of ``n`` entries (docs/semantics.md), in double."""
    k_top = int(math.floor(float(top) * n + COUNT_EPS))
    k_top = min(k_top, n)
    k_keep = int(math.floor(float(keep) * n + COUNT_EPS))
    k_keep = max(0, min(k_keep, n - k_top))
    return k_top, k_keep


def check_grad(g: object, name: str) -> None:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(g).__name__}")
    if g.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {g.dtype}; DGP supports float32, float64, float16 and bfloat16"
        )


def check_residual(g: torch.Tensor, e: object, name: str) -> None:
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(e).__name__}")
    if e.shape != g.shape or e.dtype != g.dtype or e.device != g.device:
        raise ValueError(
            f"{name} must match its gradient in shape, dtype and device: gradient is "
            f"{tuple(g.shape)} {g.dtype} on {g.device}, {name} is "
            f"{tuple(e.shape)} {e.dtype} on {e.device}"
        )


def _check_list(xs: object, name: str) -> None:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")


def check_grads(gs: Sequence[torch.Tensor], name: str) -> None:
    _check_list(gs, name)
    for i, g in enumerate(gs):
        check_grad(g, f"{name}[{i}]")
    if gs:
        d0, dev0 = gs[0].dtype, gs[0].device
        for i, g in enumerate(gs):
            if g.dtype != d0 or g.device != dev0:
                raise ValueError(
                    f"all tensors of {name} must share one dtype and device (values are "
                    f"returned in one flat tensor): {name}[0] is {d0} on {dev0}, "
                    f"{name}[{i}] is {g.dtype} on {g.device}"
                )


def check_residuals(gs: Sequence[torch.Tensor], residuals: object) -> None:
    """A list of residuals pairing up with ``gs`` (same length; each matches its gradient)."""
    _check_list(residuals, "residuals")
    if len(residuals) != len(gs):
        raise ValueError(
            f"residuals has {len(residuals)} tensors but gs has {len(gs)}; "
            "they must pair up one residual per gradient"
        )
    for i, (g, e) in enumerate(zip(gs, residuals)):
        check_residual(g, e, f"residuals[{i}]")
