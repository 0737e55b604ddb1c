"""Typed records that cross the codec boundary: one client's upload of a whole model.

A :class:`SparsePayload` is what compressors produce and what the wire format
(:mod:`dgp_kernels.codec.wire`) encodes to bytes and decodes back. One
:class:`LayerPayload` per model tensor, in model order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch


class PayloadError(ValueError):
    """The one exception type raised for any malformed, truncated or mismatched payload.

    The message says what is wrong and where (byte offset and/or layer number). A payload
    that raises this contributes nothing to any accumulator.
    """


@dataclass(frozen=True)
class LayerPayload:
    """One tensor's share of an upload.

    Attributes:
        numel: number of entries of the dense tensor (its shape lives with the model).
        indices: int64 ``[k]`` flat row-major indices, strictly increasing, in
            ``[0, numel)``; ``None`` means the positions are implicit: either every position
            (``k == numel``, dense) or, in an aligned payload, positions agreed out of band.
        values: ``[k]`` float32, bfloat16 or float16 values at those positions.
    """

    numel: int
    indices: Optional[torch.Tensor]
    values: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.values.numel())


@dataclass(frozen=True)
class SparsePayload:
    """One client's upload for one round: a layer record per model tensor.

    Attributes:
        layers: the per-tensor records, in model order.
        aligned: True for ADGP uploads whose positions were chosen by the broadcaster and
            are not sent (every layer's ``indices`` is ``None`` and ``k`` may be < numel).
        meta: small free-form integers a compressor needs on the server side (e.g. QSGD's
            number of levels); encoded on the wire.
    """

    layers: Tuple[LayerPayload, ...]
    aligned: bool = False
    meta: Tuple[Tuple[str, int], ...] = field(default_factory=tuple)

    @property
    def num_values(self) -> int:
        return sum(layer.k for layer in self.layers)
