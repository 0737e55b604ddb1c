"""Triton kernels for CUDA tensors; see README.md in this folder.

``register()`` is called once by :mod:`dgp_kernels._backend` at import. It registers the
wrappers of :mod:`.ops` as the ``CUDA`` implementation of every ``dgp::`` op, or
returns False (registering nothing, so CUDA falls back to the reference) when triton is
not importable or this torch build has no GPU backend. ``import dgp_kernels`` therefore
never needs triton, and on a CPU-only torch it does not pay triton's import time.

Route: ``Library.impl(name, fn, "CUDA")`` on the schemas defined once in
``dgp_kernels/ops/select.py``, not ``torch.library.triton_op``: ``triton_op`` defines its own
op (it cannot attach to a ``Library``-defined schema without a second definition), and the
NaN rule needs a data-dependent host check between phases that Inductor could not trace
anyway. ``torch.compile`` still compiles graphs containing the ops (``fullgraph=True``) as
opaque custom ops through their fake kernels.
"""

from __future__ import annotations


def register() -> bool:
    """Register the Triton kernels for the CUDA key; False (nothing registered) when
    triton is missing or torch has no CUDA/ROCm backend."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return False  # CPU-only torch: no CUDA tensor can ever reach the CUDA key
    try:
        import triton  # noqa: F401

        from .ops import IMPLS
    except ImportError:
        return False
    from ...ops import register_kernels

    register_kernels(IMPLS, "CUDA")
    return True


_PUBLIC = {
    "Tuning": "tuning", "DEFAULT": "tuning", "cuda_graphs": "graphs", "CallInfo": "launch",
    "band_multi_triton": "launch", "select_triton": "ops", "select_ef_triton": "ops",
    "prune_triton": "ops", "prune_inplace_triton": "ops", "select_multi_triton": "ops",
    "select_ef_multi_triton": "ops",
}


def __getattr__(name):
    # The public pieces, imported on first use so that ``import dgp_kernels`` never needs
    # triton: ``Tuning`` / ``DEFAULT`` (how a call is split into launches), ``cuda_graphs``
    # (opt-in graph replay for the ``torch.ops.dgp.*`` ops), ``CallInfo`` (what a call did),
    # the launcher and the op implementations (which take ``tuning=`` and ``info=``).
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(name)
