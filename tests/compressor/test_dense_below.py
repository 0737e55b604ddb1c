"""The ``dgp`` compressor's ``dense_below``: tensors below a size are sent dense, with the
same exact bookkeeping (``decoded + e_new == g + e_old`` bitwise), and the default sends
dense exactly the tensors whose band would be empty."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.codec import decode, encode
from dgp_kernels.compressor import get_compressor
from dgp_kernels.ops import band_counts, reference
from dgp_kernels.spec import parse_spec, parse_value

from ._helpers import assert_payloads_equal, make_grads

SHAPES = [(16, 3, 3, 3), (16,), (1,), (0,), (2,), (4,), (5,), (10, 33), (999,), (1000,)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _decoded(payload, grads):
    out = []
    for layer, g in zip(payload.layers, grads):
        d = torch.zeros(g.numel(), dtype=g.dtype)
        if layer.indices is None:
            d[:] = layer.values.to(g.dtype)
        else:
            d[layer.indices] = layer.values.to(g.dtype)
        out.append(d)
    return out


def test_default_sends_dense_only_empty_bands():
    c = get_compressor("dgp")
    assert c.dense_below is None and c.params()["dense_below"] is None
    gs = make_grads(0, SHAPES)
    p = c.compress(gs)
    for layer, g in zip(p.layers, gs):
        n = g.numel()
        empty = band_counts(n, 0.05, 0.2)[1] == 0
        assert (layer.indices is None) == (empty and n > 0), n
        if layer.indices is None:
            assert torch.equal(layer.values, g.reshape(-1))
    # Tensors with a non-empty band: the authors' bits.
    for layer, g, e in zip(p.layers, gs, c.memory.peek()):
        if layer.indices is not None:
            idx, val = reference.select(g, 0.05, 0.2)
            assert torch.equal(layer.indices, idx) and torch.equal(layer.values, val)
        else:
            assert torch.equal(e, torch.zeros_like(e))


@pytest.mark.parametrize("threshold", [0, 5, 17, 1000, 10**6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16", "float16"])
def test_bookkeeping_is_bitwise(threshold, dtype, value_dtype):
    c = get_compressor("dgp", dense_below=threshold, value_dtype=value_dtype, top_feedback="clipped")
    ref = get_compressor("dgp", dense_below=0, value_dtype=value_dtype, top_feedback="clipped")
    for r in range(4):
        gs = make_grads(r, SHAPES, dtype=dtype)
        old = [e.clone() for e in c.memory.peek()] if c.memory.peek() else [torch.zeros_like(g) for g in gs]
        ref.memory.load_state_dict({"residuals": old})
        p, pr = c.compress(gs), ref.compress(gs)
        for i, (g, e0, e1, dec, layer, lr_) in enumerate(zip(gs, old, c.memory.peek(), _decoded(p, gs),
                                                               p.layers, pr.layers)):
            n = g.numel()
            v = g.reshape(-1) + e0.reshape(-1)
            if n < threshold:
                assert layer.indices is None and layer.k == n, i
            else:  # the sparse layers are exactly those of dense_below=0
                assert layer.indices is not None and torch.equal(layer.indices, lr_.indices), i
                assert torch.equal(layer.values.view(torch.int16 if layer.values.element_size() == 2 else torch.int32),
                                   lr_.values.view(torch.int16 if lr_.values.element_size() == 2 else torch.int32)), i
                assert torch.equal(e1, ref.memory.peek()[i]), i
                continue
            # Dense: what is not sent exactly is the value dtype's rounding error.
            exact = value_dtype == "float32" and dtype in (torch.float32, torch.bfloat16, torch.float16)
            if exact:
                assert torch.equal(e1.reshape(-1), torch.zeros_like(v)), i
            if dtype == torch.float64 or dtype == torch.float32 or value_dtype == "float32" or \
                    (value_dtype == "bfloat16") == (dtype == torch.bfloat16):
                fin = torch.isfinite(v) & (v.abs() <= 65504)
                assert torch.equal((dec + e1.reshape(-1))[fin], v[fin]), i


def test_round_trips_through_the_codec():
    c = get_compressor("dgp", dense_below=100)
    gs = make_grads(3, SHAPES)
    p = c.compress(gs)
    q = decode(encode(p), [g.numel() for g in gs])
    for a, b in zip(p.layers, q.layers):
        assert (a.indices is None) == (b.indices is None)
        assert torch.equal(a.values, b.values)


def test_without_error_feedback_and_top_zero():
    for kw in (dict(error_feedback=False), dict(top=0.0, keep=0.1)):
        c = get_compressor("dgp", dense_below=17, **kw)
        gs = make_grads(1, SHAPES)
        p = c.compress(gs)
        for layer, g in zip(p.layers, gs):
            if 0 < g.numel() < 17 or g.numel() == 0:
                assert layer.indices is None and torch.equal(layer.values, g.reshape(-1))


def test_nan_in_a_dense_layer_modifies_nothing():
    c = get_compressor("dgp", dense_below=20)
    c.compress(make_grads(0, SHAPES))
    before = [e.clone() for e in c.memory.peek()]
    gs = make_grads(1, SHAPES)
    gs[1][3] = float("nan")  # a 16-entry tensor: dense
    with pytest.raises(ValueError, match="NaN"):
        c.compress(gs)
    assert all(torch.equal(a, b) for a, b in zip(before, c.memory.peek()))
    gs = make_grads(1, SHAPES)
    gs[0].view(-1)[7] = float("nan")  # a sparse layer: the dense ones are not written either
    with pytest.raises(ValueError, match="NaN"):
        c.compress(gs)
    assert all(torch.equal(a, b) for a, b in zip(before, c.memory.peek()))


def test_state_and_old_states():
    a = get_compressor("dgp", dense_below=17)
    a.compress(make_grads(0, SHAPES))
    sd = a.state_dict()
    assert sd["params"]["dense_below"] == 17
    b = get_compressor("dgp", dense_below=17)
    b.load_state_dict(sd)
    assert_payloads_equal(a.compress(make_grads(2, SHAPES)), b.compress(make_grads(2, SHAPES)))
    with pytest.raises(ValueError, match="dense_below"):
        get_compressor("dgp").load_state_dict(sd)
    # A state saved before the parameter existed loads into the default.
    d = get_compressor("dgp")
    d.compress(make_grads(0, SHAPES))
    old = d.state_dict()
    old = dict(old, params={k: v for k, v in old["params"].items() if k != "dense_below"})
    get_compressor("dgp").load_state_dict(old)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1.5, TypeError), ("10", TypeError), (True, TypeError)])
def test_bad_threshold(bad, exc):
    with pytest.raises(exc, match="dense_below"):
        get_compressor("dgp", dense_below=bad)


def test_topk_keeps_its_operator():
    c = get_compressor("topk")
    assert "dense_below" not in c.params()
    p = c.compress(make_grads(0, SHAPES))
    assert all(layer.indices is not None for layer in p.layers)


def test_from_a_defense_spec():
    name, raw = parse_spec("dgp:dense_below=1000,top_feedback=clipped")
    c = get_compressor(name, **{k: parse_value(v) for k, v in raw.items()})
    assert c.dense_below == 1000 and c.top_feedback == "clipped"
