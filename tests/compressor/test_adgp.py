"""ADGP: aligned uploads, as-sparse-as-one-upload aggregate, the broadcaster's rule."""

from __future__ import annotations

import pytest
import torch

import dgp_kernels
from dgp_kernels.codec.payload import LayerPayload, PayloadError, SparsePayload
from dgp_kernels.compressor import (
    ADGPCompressor,
    AlignedPositions,
    Broadcaster,
    aggregate_aligned,
    decompress_aligned,
    get_compressor,
)
from dgp_kernels.ops import band_counts

from ._helpers import clone_all, make_grads

N_CLIENTS = 3


def test_rounds_aligned_conserving_and_as_sparse_as_one_upload():
    b = Broadcaster()
    clients = [get_compressor("adgp") for _ in range(N_CLIENTS)]
    pos = b.choose(make_grads(999))
    # Round 1 rule: the band of the broadcaster's own gradient.
    for g, idx in zip(make_grads(999), pos.indices):
        assert torch.equal(idx, dgp_kernels.select(g, 0.05, 0.20)[0])
    like = make_grads(0)
    for r in range(5):
        grads = [make_grads(10 * r + c) for c in range(N_CLIENTS)]
        uploads = []
        for c, g in zip(clients, grads):
            old = clone_all(c.memory.peek()) if c.memory.initialized else [torch.zeros_like(x) for x in g]
            c.set_positions(pos)
            p = c.compress(g)
            uploads.append(p)
            # Values only, at the broadcaster's positions, the DGP count per layer.
            assert p.aligned
            for layer, x, idx in zip(p.layers, g, pos.indices):
                assert layer.indices is None
                assert layer.numel == x.numel()
                assert layer.k == idx.numel() == band_counts(x.numel(), 0.05, 0.20)[1]
            # Error feedback absorbs the rest, exactly.
            sent = decompress_aligned(p, pos, g)
            for s, e, x, eo, idx in zip(sent, c.memory.peek(), g, old, pos.indices):
                assert torch.equal(s + e, x + eo)
                assert not e.view(-1)[idx].any()  # float32 values: nothing left where sent
        agg = aggregate_aligned(uploads, pos)
        assert agg.aligned
        assert [l.k for l in agg.layers] == [l.k for l in uploads[0].layers]
        assert agg.num_values == uploads[0].num_values
        mean = [(u0.values + u1.values + u2.values) / 3 for u0, u1, u2 in zip(*(u.layers for u in uploads))]
        for layer, m in zip(agg.layers, mean):
            assert layer.values.dtype == torch.float32
            torch.testing.assert_close(layer.values, m, rtol=1e-6, atol=0)
        update = decompress_aligned(agg, pos, like)
        for u, idx in zip(update, pos.indices):
            support = u.view(-1).nonzero().view(-1)
            assert bool(torch.isin(support, idx).all())  # download support within positions
        twin = Broadcaster()
        twin.load_state_dict(b.state_dict())
        nxt = b.observe(update)
        # Feeding the aggregate payload itself picks the same positions.
        for x, y in zip(twin.observe(agg).indices, nxt.indices):
            assert torch.equal(x, y)
        # Later rounds: the band of the previous round's aggregated update.
        for u, idx in zip(update, nxt.indices):
            assert torch.equal(idx, dgp_kernels.select(u, 0.05, 0.20)[0])
        assert nxt.round == r + 1
        pos = nxt


def test_weighted_aggregate():
    pos = Broadcaster(top=0.0, keep=0.5).choose([torch.arange(8.0)])
    ups = [
        SparsePayload((LayerPayload(8, None, torch.full((4,), v)),), aligned=True) for v in (1.0, 4.0)
    ]
    agg = aggregate_aligned(ups, pos, weights=[3, 1])
    assert agg.layers[0].values.tolist() == [1.75] * 4
    assert decompress_aligned(agg, pos, [(8,)])[0].tolist() == [0.0] * 4 + [1.75] * 4
    with pytest.raises(ValueError, match="weights"):
        aggregate_aligned(ups, pos, weights=[0, 0])
    with pytest.raises(ValueError, match="weights"):
        aggregate_aligned(ups, pos, weights=[1])


def test_bf16_values_conserve_too():
    pos = Broadcaster().choose(make_grads(5))
    c = ADGPCompressor(value_dtype="bfloat16")
    c.set_positions(pos)
    g = make_grads(6)
    for _ in range(3):
        old = clone_all(c.memory.peek()) if c.memory.initialized else [torch.zeros_like(x) for x in g]
        p = c.compress(g)
        assert all(l.values.dtype == torch.bfloat16 for l in p.layers)
        for s, e, x, eo in zip(c.decompress(p, g), c.memory.peek(), g, old):
            assert torch.equal(s + e, x + eo)


def test_errors():
    b = Broadcaster()
    with pytest.raises(RuntimeError, match="choose"):
        b.observe(make_grads(0))
    pos = b.choose(make_grads(0))
    with pytest.raises(ValueError, match="layer sizes"):
        b.observe(make_grads(0)[:2])
    c = ADGPCompressor()
    with pytest.raises(RuntimeError, match="set_positions"):
        c.compress(make_grads(0))
    with pytest.raises(TypeError, match="AlignedPositions"):
        c.set_positions([torch.arange(3)])
    c.set_positions(pos)
    with pytest.raises(ValueError, match="layer sizes"):
        c.compress([torch.randn(3)])
    good = c.compress(make_grads(1))
    plain = get_compressor("dgp").compress(make_grads(1))
    with pytest.raises(PayloadError, match="payload 1 is not aligned"):
        aggregate_aligned([good, plain], pos)
    short = SparsePayload(good.layers[:-1], aligned=True)
    with pytest.raises(PayloadError, match="layers but the positions"):
        aggregate_aligned([good, short], pos)
    wrong_k = SparsePayload(
        (LayerPayload(good.layers[0].numel, None, good.layers[0].values[:-1]),) + good.layers[1:],
        aligned=True,
    )
    with pytest.raises(PayloadError, match="layer 0: .* values but the round has"):
        aggregate_aligned([wrong_k], pos)
    with pytest.raises(ValueError, match="non-empty"):
        aggregate_aligned([], pos)
    with pytest.raises(ValueError, match="AlignedPositions has"):
        AlignedPositions((torch.arange(2),), (4, 5))


def test_empty_model():
    b = Broadcaster()
    pos = b.choose([])
    c = ADGPCompressor()
    c.set_positions(pos)
    p = c.compress([])
    assert p.aligned and p.layers == ()
    agg = aggregate_aligned([p, p], pos)
    assert decompress_aligned(agg, pos, []) == []
    assert b.observe([]).round == 1
