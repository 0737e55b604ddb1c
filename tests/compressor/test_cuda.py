"""Compressors on CUDA tensors: same payloads as on the CPU (collected only with a GPU)."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.compressor import Broadcaster, aggregate_aligned, decompress_aligned, get_compressor

from ._helpers import assert_payloads_equal, make_grads

pytestmark = pytest.mark.cuda  # collected only where a CUDA device is present


def _cpu(p):
    from dgp_kernels.codec.payload import LayerPayload, SparsePayload

    return SparsePayload(
        tuple(
            LayerPayload(l.numel, None if l.indices is None else l.indices.cpu(), l.values.cpu())
            for l in p.layers
        ),
        aligned=p.aligned,
        meta=p.meta,
    )


@pytest.mark.parametrize(
    "name,params",
    [
        ("dgp", {}),
        ("dgp", {"value_dtype": "bfloat16"}),
        ("topk", {"error_feedback": True}),
        ("randk", {"seed": 1, "error_feedback": True}),
        ("dp", {"seed": 2}),
        ("none", {}),
    ],
)
def test_cuda_payloads_match_cpu(name, params):
    a, b = get_compressor(name, **params), get_compressor(name, **params)
    for r in range(3):
        g = make_grads(r)
        pc = a.compress(g)
        pg = b.compress([x.cuda() for x in g])
        for layer in pg.layers:
            assert layer.values.is_cuda
        assert_payloads_equal(pc, _cpu(pg))
    if a.memory.initialized:
        for x, y in zip(a.memory.peek(), b.memory.peek()):
            assert torch.equal(x, y.cpu())


def test_cuda_qsgd_and_adgp_run():
    g = [x.cuda() for x in make_grads(0)]
    p = get_compressor("qsgd", seed=0).compress(g)
    assert all(l.values.is_cuda and l.k == x.numel() for l, x in zip(p.layers, g))
    b = Broadcaster()
    pos = b.choose(g)
    cl = [get_compressor("adgp") for _ in range(2)]
    for c in cl:
        c.set_positions(pos)
    agg = aggregate_aligned([c.compress(g) for c in cl], pos)
    upd = decompress_aligned(agg, pos, g)
    assert all(u.is_cuda for u in upd)
    b.observe(upd)
