"""Baselines that ``dgp bench`` and ``bench/`` measure our ops against. Not part of the op API.

* :func:`authors_dgp` — the DGP authors' operator, written the way their code does it: per
  tensor two ``torch.topk`` calls over ``|v|`` and two ``scatter_`` calls into a dense mask.
* :func:`single_topk` — one ``torch.topk`` of ``k_keep`` per layer: the cost of classic
  (top-k) gradient pruning.
* :func:`clone_all` — ``clone()`` of every tensor: the memory-bandwidth yardstick (one read,
  one write of each tensor).

These are baselines, not implementations of the contract in docs/semantics.md:
``torch.topk`` does not promise which of several equal magnitudes it returns, so on ties
the authors' band can differ from ours (the counts are the same). On tie-free inputs
:func:`authors_dgp` keeps exactly the entries :func:`dgp_kernels.select` keeps
(``tests/ops/test_baselines.py``). Other differences, kept because they are the authors':
``v * mask`` writes ``-0.0`` (not ``+0.0``) for dropped negative entries and at kept
positions of the residual, and ``±inf * 0`` gives NaN; there is no NaN check.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import DEFAULT_KEEP, DEFAULT_TOP, band_counts

__all__ = ["authors_dgp", "single_topk", "clone_all"]


def authors_dgp(
    gs: Sequence[Tensor],
    residuals: Optional[Sequence[Tensor]] = None,
    top: float = DEFAULT_TOP,
    keep: float = DEFAULT_KEEP,
) -> List[Tensor]:
    """The DGP authors' operator (two ``torch.topk`` + scatter masks), one tensor at a time.

    Args:
        gs: gradient tensors (any shapes, float dtypes); not modified.
        residuals: error-feedback memory, one per gradient (same shape and dtype), or ``None``
            for the single-round operator. When given, ``v = g + e`` is pruned and each
            residual is overwritten in place with ``v * (1 - mask)``.
        top, keep: fractions as in :func:`dgp_kernels.select`; counts from
            :func:`dgp_kernels.band_counts` (``n // 20`` and ``n // 5`` for the defaults).

    Returns:
        A list of dense tensors shaped like ``gs``: ``v * mask`` (the band's values, zeros
        elsewhere). Baseline only: which tied entries are kept is up to ``torch.topk``.
    """
    if residuals is not None and len(residuals) != len(gs):
        raise ValueError(
            f"residuals has {len(residuals)} tensors but gs has {len(gs)}; "
            "they must pair up one residual per gradient"
        )
    outs = []
    for i, g in enumerate(gs):
        v = g + residuals[i] if residuals is not None else g
        a = v.abs().flatten()
        k_top, k_keep = band_counts(a.numel(), top, keep)
        mask = torch.zeros_like(a)
        mask.scatter_(0, torch.topk(a, k_top + k_keep).indices, 1)
        mask.scatter_(0, torch.topk(a, k_top).indices, 0)
        mask = mask.view(v.shape)
        outs.append(v * mask)
        if residuals is not None:
            residuals[i].copy_(v * (1 - mask))
    return outs


def single_topk(
    gs: Sequence[Tensor], keep: float = DEFAULT_KEEP
) -> List[Tuple[Tensor, Tensor]]:
    """Classic gradient pruning: one ``torch.topk`` of ``floor(keep * n)`` per layer.

    Returns per layer ``(indices, values)``: int64 flat indices of the ``k`` largest ``|g|``
    (in ``torch.topk``'s order, not sorted; ties broken however ``torch.topk`` does) and
    ``g.flatten()[indices]``. ``gs`` is not modified.
    """
    out = []
    for g in gs:
        flat = g.flatten()
        _, k = band_counts(flat.numel(), 0.0, keep)
        idx = torch.topk(flat.abs(), k).indices
        out.append((idx, flat[idx]))
    return out


def clone_all(gs: Sequence[Tensor]) -> List[Tensor]:
    """``clone()`` of every tensor: the memory-bandwidth floor any selector is compared to."""
    return [g.clone() for g in gs]
