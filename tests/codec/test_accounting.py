"""Bytes accounting: sizes come from the real encoded payloads."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.codec import (
    LayerPayload,
    RoundBytes,
    SparsePayload,
    TrafficLog,
    dense_nbytes,
    encode,
    payload_nbytes,
)

from ._helpers import random_layer


def test_payload_nbytes_is_the_encoded_length():
    p = SparsePayload((random_layer(1000, 200, 0), LayerPayload(7, None, torch.randn(7))), meta=(("s", 2),))
    data = encode(p)
    assert payload_nbytes(p) == len(data)
    assert payload_nbytes(data) == len(data)
    assert payload_nbytes(bytearray(data)) == len(data)
    assert payload_nbytes(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == len(data)
    assert payload_nbytes(p, "bfloat16") == len(encode(p, "bfloat16")) < len(data)
    # header 16 + meta (1+1+8) + 2 x 28 + crc 4 + the streams
    assert payload_nbytes(SparsePayload(())) == 20
    with pytest.raises(TypeError):
        payload_nbytes([1, 2])


def test_dense_nbytes():
    assert dense_nbytes([10, 5]) == 60
    assert dense_nbytes([10, 5], itemsize=2) == 30


def test_round_bytes_and_traffic_log():
    log = TrafficLog()
    assert log.summary() is None
    r = log.record(0, [100, 300], download=400, dense=1000)
    assert isinstance(r, RoundBytes) and r.clients == 2
    assert r.upload_total == 400 and r.download_total == 800
    assert r.upload_ratio == 0.2 and r.download_ratio == 0.4
    log.record(1, [200], download=100, dense=1000)
    s = log.summary()
    assert s["rounds"] == 2 and s["upload_bytes"] == 600 and s["download_bytes"] == 900
    assert s["upload_ratio"] == pytest.approx((0.2 + 0.2) / 2)
    assert RoundBytes(0, (), 0, 0).upload_ratio == 0.0
