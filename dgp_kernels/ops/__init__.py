"""The public op surface: ``torch.ops.dgp.*`` schemas, fake kernels and wrappers."""

from . import reference
from .checks import DEFAULT_KEEP, DEFAULT_TOP, SUPPORTED_DTYPES, band_counts
from .select import (
    BandHint,
    prune,
    prune_,
    register_kernels,
    register_reference,
    select,
    select_ef,
    select_ef_multi,
    select_ef_multi_into,
    one_sweep_available,
    select_multi,
    split_multi,
)

__all__ = [
    "BandHint",
    "DEFAULT_KEEP",
    "DEFAULT_TOP",
    "SUPPORTED_DTYPES",
    "band_counts",
    "prune",
    "prune_",
    "reference",
    "register_kernels",
    "register_reference",
    "select",
    "select_ef",
    "select_ef_multi",
    "select_ef_multi_into",
    "one_sweep_available",
    "select_multi",
    "split_multi",
]
