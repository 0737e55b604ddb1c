"""Bytes accounting from real encoded payloads, for the simulator and the integrations.

Counts come from the bytes that would cross the network (``len(encode(...))``), never from
estimates, so every compressor is charged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .payload import SparsePayload

__all__ = ["RoundBytes", "TrafficLog", "dense_nbytes", "payload_nbytes"]


def payload_nbytes(payload: Union[SparsePayload, bytes, bytearray, memoryview, torch.Tensor],
                   value_dtype=None) -> int:
    """Size in bytes of a payload on the wire.

    Bytes (or a uint8 tensor) are measured as they are; a :class:`SparsePayload` is encoded
    with ``value_dtype`` (see :func:`dgp_kernels.codec.encode`) and measured, so the figure is
    exact, headers, layer table and checksum included.
    """
    if isinstance(payload, SparsePayload):
        from .wire import encode

        return len(encode(payload, value_dtype))
    if isinstance(payload, torch.Tensor):
        return int(payload.numel() * payload.element_size())
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return memoryview(payload).nbytes
    raise TypeError(f"payload must be a SparsePayload, bytes or a uint8 tensor, got {type(payload).__name__}")


def dense_nbytes(numels: Sequence[int], itemsize: int = 4) -> int:
    """Bytes of the dense model (float32 by default): the baseline every ratio divides by."""
    return int(sum(int(n) for n in numels)) * int(itemsize)


@dataclass(frozen=True)
class RoundBytes:
    """Traffic of one round.

    Attributes:
        round: round number.
        upload: bytes each participating client sent, in client order.
        download: bytes of the broadcast each client received (the aggregate or model).
        dense: bytes of one dense float32 copy of the model (the reference size).
    """

    round: int
    # (typed fields: the duplicate report pairs their shape with wire.AccumulateReport's)
    upload: Tuple[int, ...]
    download: int
    dense: int

    @property
    def clients(self) -> int:
        return len(self.upload)

    @property
    def upload_total(self) -> int:
        return sum(self.upload)

    @property
    def download_total(self) -> int:
        """Download summed over the clients that took part."""
        return self.download * len(self.upload)

    @property
    def upload_ratio(self) -> float:
        """Mean upload per client relative to the dense float32 model."""
        return self.upload_total / (len(self.upload) * self.dense) if self.upload and self.dense else 0.0

    @property
    def download_ratio(self) -> float:
        return self.download / self.dense if self.dense else 0.0


@dataclass
class TrafficLog:
    """Per-round byte counts of a whole run (append one :class:`RoundBytes` per round)."""

    rounds: List[RoundBytes] = field(default_factory=list)

    def record(self, round: int, upload: Sequence[int], download: int, dense: int) -> RoundBytes:
        rb = RoundBytes(round=int(round), upload=tuple(int(u) for u in upload), download=int(download),
                        dense=int(dense))
        self.rounds.append(rb)
        return rb

    @property
    def upload_total(self) -> int:
        return sum(r.upload_total for r in self.rounds)

    @property
    def download_total(self) -> int:
        return sum(r.download_total for r in self.rounds)

    def summary(self) -> Optional[dict]:
        """Totals and mean ratios (None before the first round), e.g. for a results table."""
        if not self.rounds:
            return None
        return {
            "rounds": len(self.rounds),
            "upload_bytes": self.upload_total,
            "download_bytes": self.download_total,
            "upload_ratio": sum(r.upload_ratio for r in self.rounds) / len(self.rounds),
            "download_ratio": sum(r.download_ratio for r in self.rounds) / len(self.rounds),
        }
