"""dgp_kernels: fast, exact Dual Gradient Pruning (DGP) for PyTorch.

``import dgp_kernels`` defines the ``torch.ops.dgp.*`` ops and loads the fastest backend
available (C++ on CPU, Triton on CUDA, else the pure-torch reference).
"""

from . import ops
from ._backend import INFO as _INFO, BackendInfo
from .ops import (
    BandHint,
    band_counts,
    prune,
    prune_,
    select,
    select_ef,
    select_ef_multi,
    select_ef_multi_into,
    select_multi,
    split_multi,
)

#: The package version: the single source (pyproject.toml reads it from here).
__version__ = "0.1.0"


def backend_info() -> BackendInfo:
    """Which implementation serves CPU and CUDA tensors in this process, and why."""
    return _INFO


__all__ = [
    "BandHint",
    "BackendInfo",
    "backend_info",
    "band_counts",
    "ops",
    "prune",
    "prune_",
    "select",
    "select_ef",
    "select_ef_multi",
    "select_ef_multi_into",
    "select_multi",
    "split_multi",
]
