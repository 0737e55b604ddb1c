"""Every compressor's payload survives the wire codec exactly, and the codec's ADGP
aggregation agrees with :func:`aggregate_aligned` (skipped while the codec is absent)."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.compressor import Broadcaster, aggregate_aligned, decompress_aligned, get_compressor

from dgp_kernels.codec.payload import LayerPayload, SparsePayload

from ._helpers import assert_payloads_equal, make_grads
from .test_state import CONFIGS, _prepare

try:
    from dgp_kernels.codec import decode, decode_accumulate, encode
except ImportError as exc:  # the codec is built in parallel; these tests wait for it
    pytestmark = pytest.mark.skip(reason=f"dgp_kernels.codec encode/decode not available: {exc}")


def _explicit(p: SparsePayload) -> SparsePayload:
    """The codec writes a layer with ``k == numel`` as implicit positions (``indices=None``,
    which means "every position"); spell those out so payloads compare field by field."""
    if p.aligned:
        return p
    return SparsePayload(
        tuple(
            LayerPayload(l.numel, torch.arange(l.numel) if l.indices is None else l.indices, l.values)
            for l in p.layers
        ),
        meta=p.meta,
    )


@pytest.mark.parametrize("name,params", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_payload_round_trips_through_the_wire(name, params):
    c = get_compressor(name, **params)
    for r in range(2):
        _prepare(c, r)
        g = make_grads(r)
        p = c.compress(g)
        blob = encode(p)
        q = decode(blob, [x.numel() for x in g])
        assert_payloads_equal(_explicit(p), _explicit(q))
        for a, b in zip(c.decompress(p, g), c.decompress(q, g)):
            assert torch.equal(a, b)
    fresh = get_compressor(name, **params)  # an empty model round-trips too
    if name == "adgp":
        fresh.set_positions(Broadcaster().choose([]))
    p = fresh.compress([])
    assert_payloads_equal(p, decode(encode(p), []))
    assert p.layers == ()


def test_codec_aligned_accumulate_matches_aggregate_aligned():
    g0 = make_grads(0)
    pos = Broadcaster().choose(g0)
    clients = [get_compressor("adgp") for _ in range(3)]
    ups = []
    for i, c in enumerate(clients):
        c.set_positions(pos)
        ups.append(c.compress(make_grads(10 + i)))
    mean = decompress_aligned(aggregate_aligned(ups, pos), pos, g0)
    out = [torch.zeros(x.shape) for x in g0]
    report = decode_accumulate([encode(u) for u in ups], out, indices=list(pos.indices), strict=True)
    assert report.num_accepted == 3
    for a, b in zip(mean, out):
        # Both sum clients in order in float32; the mean divides once at the end.
        assert torch.equal(a, b / 3)
