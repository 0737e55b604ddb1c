"""Compressors (GRACE-style): one client's gradients -> :class:`SparsePayload`, with
error-feedback :class:`Memory`, checkpointable state and a registry by name.

Registered names: ``none``, ``dgp``, ``adgp``, ``topk``, ``randk``, ``dp``, ``qsgd``
(:func:`available_compressors`). ADGP's server side is :class:`Broadcaster`,
:func:`aggregate_aligned` and :func:`decompress_aligned`.
"""

from .base import (
    COMPRESSORS,
    VALUE_DTYPES,
    Compressor,
    Memory,
    available_compressors,
    get_compressor,
    register_compressor,
)
from .dgp import DGPCompressor, TopKCompressor
from .adgp import ADGPCompressor, AlignedPositions, Broadcaster, aggregate_aligned, decompress_aligned
from .baselines import QSGD_LEVELS_META, DPCompressor, NoneCompressor, QSGDCompressor, RandKCompressor

__all__ = [
    "COMPRESSORS",
    "VALUE_DTYPES",
    "Compressor",
    "Memory",
    "available_compressors",
    "get_compressor",
    "register_compressor",
    "DGPCompressor",
    "TopKCompressor",
    "ADGPCompressor",
    "AlignedPositions",
    "Broadcaster",
    "aggregate_aligned",
    "decompress_aligned",
    "NoneCompressor",
    "RandKCompressor",
    "DPCompressor",
    "QSGDCompressor",
    "QSGD_LEVELS_META",
]
