"""Pure-torch, sort-based reference of DGP band selection: the oracle and the fallback.

Every backend (C++ CPU, Triton, CUDA) must agree with these functions bit for bit:
same indices, same values, same residual. They are written for clarity, not speed:
one stable sort of the magnitude keys per tensor (O(n log n)), on any device.

Semantics (docs/semantics.md):

* counts: ``k_top = floor(top * n + 1e-6)``,
  ``k_keep = min(floor(keep * n + 1e-6), n - k_top)`` in double precision;
* order: ``|x|`` descending, ties by ascending flat (row-major) index; ``+0.0 == -0.0``,
  ``±inf`` is the largest magnitude;
* kept: ranks ``k_top <= r < k_top + k_keep``; indices sorted ascending, values unchanged;
* error feedback: ``v = g + e; kept = band(v); e <- v`` with the kept positions set to 0;
* a NaN anywhere raises ``ValueError`` naming the tensor.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

# (the same check functions as ops/select.py: both layers check at their boundary)
from .checks import (
    band_counts,
    check_fractions,
    check_grad,
    check_grads,
    check_residual,
    check_residuals,
)

__all__ = [
    "magnitude_key",
    "select",
    "select_ef",
    "prune",
    "prune_",
    "select_multi",
    "select_ef_multi",
]

# Integer view of each float dtype, and the mask that clears its sign bit. For IEEE floats
# the sign-cleared bit pattern orders |x| exactly (NaN excluded), which is what every
# backend's radix selection relies on.
_KEY_VIEW = {
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
}


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """Return the int64 key ``bits(x) & ~sign`` of a flat float tensor (orders ``|x|``)."""
    view_dtype, mask = _KEY_VIEW[x.dtype]
    return x.view(view_dtype).to(torch.int64) & mask


def _kept_indices(v: torch.Tensor, top: float, keep: float) -> torch.Tensor:
    """Sorted int64 flat indices of the band of the flat tensor ``v``."""
    n = v.numel()
    k_top, k_keep = band_counts(n, top, keep)
    if k_keep == 0:
        return torch.empty(0, dtype=torch.int64, device=v.device)
    key = magnitude_key(v)
    # A stable descending sort keeps equal keys in ascending index order: the tie rule.
    order = torch.sort(key, descending=True, stable=True).indices
    kept = order[k_top : k_top + k_keep]
    return torch.sort(kept).values


def _flat(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1)


def select(
    g: torch.Tensor, top: float = 0.05, keep: float = 0.20, *, name: str = "g"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`dgp_kernels.select`: ``(indices int64[k], values g.dtype[k])``."""
    check_fractions(top, keep)
    check_grad(g, name)
    v = _flat(g)
    if v.numel() and torch.isnan(v).any():
        raise ValueError(f"{name} contains NaN; DGP cannot rank NaN gradients")
    idx = _kept_indices(v, top, keep)
    return idx, v[idx].clone()


def select_ef(
    g: torch.Tensor,
    residual: torch.Tensor,
    top: float = 0.05,
    keep: float = 0.20,
    *,
    name: str = "g",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`dgp_kernels.select_ef`; mutates ``residual`` only on success."""
    check_fractions(top, keep)
    check_grad(g, name)
    check_residual(g, residual, "residual" if name == "g" else f"residual of {name}")
    v = _flat(g) + _flat(residual)
    if v.numel() and torch.isnan(v).any():
        raise ValueError(
            f"{name} + residual contains NaN (a NaN gradient or residual, or inf - inf); "
            "DGP cannot rank NaN gradients"
        )
    idx = _kept_indices(v, top, keep)
    values = v[idx].clone()
    v[idx] = 0
    residual.copy_(v.view(residual.shape))
    return idx, values


def prune(g: torch.Tensor, top: float = 0.05, keep: float = 0.20) -> torch.Tensor:
    """Reference of :func:`dgp_kernels.prune`: a dense copy holding only the band."""
    idx, values = select(g, top, keep)
    out = torch.zeros(g.shape, dtype=g.dtype, device=g.device)
    out.view(-1)[idx] = values
    return out


def prune_(g: torch.Tensor, top: float = 0.05, keep: float = 0.20) -> None:
    """Reference of :func:`dgp_kernels.prune_`: zero everything outside the band, in place."""
    g.copy_(prune(g, top, keep))


def _concat(
    parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], gs: Sequence[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = gs[0].device if len(gs) else torch.device("cpu")
    dtype = gs[0].dtype if len(gs) else torch.float32
    counts = [p[0].numel() for p in parts]
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    if counts:
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    if parts:
        idx = torch.cat([p[0] for p in parts])
        val = torch.cat([p[1] for p in parts])
    else:
        idx = torch.empty(0, dtype=torch.int64, device=device)
        val = torch.empty(0, dtype=dtype, device=device)
    return idx, val, offsets.to(device)


def select_multi(
    gs: Sequence[torch.Tensor], top: float = 0.05, keep: float = 0.20
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`dgp_kernels.select_multi`: flat indices, flat values, offsets."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    parts = [select(g, top, keep, name=f"gs[{i}]") for i, g in enumerate(gs)]
    return _concat(parts, gs)


def select_ef_multi(
    gs: Sequence[torch.Tensor],
    residuals: Sequence[torch.Tensor],
    top: float = 0.05,
    keep: float = 0.20,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`dgp_kernels.select_ef_multi`; all residuals untouched on error."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    check_residuals(gs, residuals)
    # Validate every layer before mutating any residual (nothing changes on error).
    for i, (g, e) in enumerate(zip(gs, residuals)):
        if g.numel() and torch.isnan(_flat(g) + _flat(e)).any():
            raise ValueError(
                f"gs[{i}] + residuals[{i}] contains NaN (a NaN gradient or residual, or "
                "inf - inf); DGP cannot rank NaN gradients"
            )
    parts = [
        select_ef(g, e, top, keep, name=f"gs[{i}]") for i, (g, e) in enumerate(zip(gs, residuals))
    ]
    return _concat(parts, gs)
