"""Sparse wire codec: payload records, wire format v1, server-side decode-and-accumulate.

See README.md in this folder for the byte layout and how to add an index coding.
"""

from .accounting import RoundBytes, TrafficLog, dense_nbytes, payload_nbytes
from .payload import LayerPayload, PayloadError, SparsePayload
from .wire import (
    CODING_NAMES,
    AccumulateReport,
    RejectedPayload,
    accumulate_on_device,
    cpp_available,
    decode,
    decode_accumulate,
    encode,
    encode_on_device,
)

__all__ = [
    "CODING_NAMES",
    "AccumulateReport",
    "LayerPayload",
    "PayloadError",
    "RejectedPayload",
    "RoundBytes",
    "SparsePayload",
    "TrafficLog",
    "accumulate_on_device",
    "cpp_available",
    "decode",
    "decode_accumulate",
    "dense_nbytes",
    "encode",
    "encode_on_device",
    "payload_nbytes",
]
