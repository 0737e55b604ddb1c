"""The ``dgp::`` ops for CUDA tensors: one wrapper per op, same arguments and results as
the reference (:mod:`dgp_kernels.ops.reference`), bit for bit.

Each wrapper checks its arguments, flattens the tensors (a copy only for non-contiguous
ones, written back afterwards) and calls :func:`.launch.band_multi_triton` with the
default tuning, or the one passed as ``tuning=`` (tests and benchmarks); CUDA-graph replay
follows :func:`.graphs.cuda_graphs`. Under ``TRITON_INTERPRET=1`` they also run on CPU
tensors, which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...ops import reference
from ...ops.checks import check_fractions, check_grad, check_grads, check_residual, check_residuals
from . import graphs
from .launch import CallInfo, band_multi_triton
from .tuning import DEFAULT, Tuning

_NAN = "{} contains NaN; DGP cannot rank NaN gradients"
_NAN_EF = (
    "{} contains NaN (a NaN gradient or residual, or inf - inf); DGP cannot rank NaN gradients"
)


def _flat(t: Tensor) -> Tensor:
    """Contiguous flat view (a copy only for non-contiguous inputs)."""
    return t.contiguous().view(-1)


def _run(gs, top, keep, tuning, info, **kwargs):
    return band_multi_triton(gs, top, keep, tuning=tuning, graphs=graphs.enabled(), info=info,
                             **kwargs)


def select_triton(g: Tensor, top: float = 0.05, keep: float = 0.20, *,
                  tuning: Tuning = DEFAULT, info: Optional[CallInfo] = None
                  ) -> Tuple[Tensor, Tensor]:
    """``dgp::select``: ``(indices int64[k_keep] ascending, values g.dtype[k_keep])``."""
    check_fractions(top, keep)
    check_grad(g, "g")
    idx, val, _ = _run([_flat(g)], top, keep, tuning, info,
                       nan_message=lambda i: _NAN.format("g"))
    return idx, val


def select_ef_triton(g: Tensor, residual: Tensor, top: float = 0.05, keep: float = 0.20, *,
                     tuning: Tuning = DEFAULT, info: Optional[CallInfo] = None
                     ) -> Tuple[Tensor, Tensor]:
    """``dgp::select_ef``: band of ``v = g + residual``; ``residual <- v`` minus the band
    (kept positions ``+0.0``). ``residual`` is untouched when ``v`` holds a NaN."""
    check_fractions(top, keep)
    check_grad(g, "g")
    check_residual(g, residual, "residual")
    e = _flat(residual)  # a view when contiguous: written in place
    idx, val, _ = _run([_flat(g)], top, keep, tuning, info, residuals=[e],
                       nan_message=lambda i: _NAN_EF.format("g + residual"))
    if e.data_ptr() != residual.data_ptr() or not residual.is_contiguous():
        residual.copy_(e.view(residual.shape))
    return idx, val


def prune_triton(g: Tensor, top: float = 0.05, keep: float = 0.20, *,
                 tuning: Tuning = DEFAULT, info: Optional[CallInfo] = None) -> Tensor:
    """``dgp::prune``: new contiguous tensor like ``g`` holding only the band."""
    check_fractions(top, keep)
    check_grad(g, "g")
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    _run([_flat(g)], top, keep, tuning, info, dense=[out.view(-1)], want_sparse=False,
         nan_message=lambda i: _NAN.format("g"))
    return out


def prune_inplace_triton(g: Tensor, top: float = 0.05, keep: float = 0.20, *,
                         tuning: Tuning = DEFAULT, info: Optional[CallInfo] = None) -> None:
    """``dgp::prune_``: zero every entry of ``g`` outside the band, in place."""
    check_fractions(top, keep)
    check_grad(g, "g")
    work = _flat(g)
    _run([work], top, keep, tuning, info, dense=[work], want_sparse=False,
         nan_message=lambda i: _NAN.format("g"))
    if not g.is_contiguous():
        g.copy_(work.view(g.shape))


def select_multi_triton(gs: Sequence[Tensor], top: float = 0.05, keep: float = 0.20, *,
                        tuning: Tuning = DEFAULT, info: Optional[CallInfo] = None
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """``dgp::select_multi``: every layer in one launch per phase; returns
    ``(indices, values, offsets)`` as the reference (layer-local indices)."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    if not gs:
        return reference.select_multi(gs, top, keep)
    return _run([_flat(g) for g in gs], top, keep, tuning, info,
                nan_message=lambda i: _NAN.format(f"gs[{i}]"))


def select_ef_multi_triton(gs: Sequence[Tensor], residuals: Sequence[Tensor],
                           top: float = 0.05, keep: float = 0.20, *,
                           tuning: Tuning = DEFAULT, info: Optional[CallInfo] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """``dgp::select_ef_multi``: fused error feedback for every layer; all residuals are
    untouched when any layer's ``g + residual`` holds a NaN."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    check_residuals(gs, residuals)
    if not gs:
        return reference.select_ef_multi(gs, residuals, top, keep)
    es = [_flat(e) for e in residuals]
    out = _run([_flat(g) for g in gs], top, keep, tuning, info, residuals=es,
               nan_message=lambda i: _NAN_EF.format(f"gs[{i}] + residuals[{i}]"))
    for e, res in zip(es, residuals):
        if not res.is_contiguous():
            res.copy_(e.view(res.shape))
    return out


IMPLS = {
    "select": select_triton,
    "select_ef": select_ef_triton,
    "prune": prune_triton,
    "prune_": prune_inplace_triton,
    "select_multi": select_multi_triton,
    "select_ef_multi": select_ef_multi_triton,
}
