"""DGP / top-k compressors: conservation under error feedback, counts, dtypes, edge cases."""

from __future__ import annotations

import pytest
import torch

import dgp_kernels
from dgp_kernels.codec.payload import SparsePayload
from dgp_kernels.compressor import DGPCompressor, TopKCompressor, get_compressor
from dgp_kernels.ops import band_counts

from ._helpers import SHAPES, _bits, clone_all, make_grads


def _check_round(c: DGPCompressor, grads, dec_dtype):
    """One round; returns after asserting decoded(sent) + e_new == g + e_old, bitwise."""
    old = clone_all(c.memory.peek()) if c.memory.initialized else [torch.zeros_like(g) for g in grads]
    v = [g + e for g, e in zip(grads, old)]  # what the op computes, in the grads' dtype
    p = c.compress(grads)
    sent = c.decompress(p, grads, dtype=dec_dtype)
    new = c.memory.peek()
    for i, (s, e, vi) in enumerate(zip(sent, new, v)):
        # Both sides in the gradients' dtype; decoding bf16/fp16 into it is exact.
        total = s.to(vi.dtype) + e
        assert torch.equal(total, vi), f"layer {i} lost mass"
    return p


@pytest.mark.parametrize(
    "grad_dtype,value_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
def test_error_feedback_conserves_sent_plus_residual(grad_dtype, value_dtype):
    c = DGPCompressor(value_dtype=value_dtype)
    dec = torch.float64 if grad_dtype == torch.float64 else torch.float32
    for r in range(25):
        # Scales up to ~1e3 (fp16-representable); residuals grow across rounds.
        p = _check_round(c, make_grads(r, dtype=grad_dtype), dec)
        for layer in p.layers:
            assert layer.values.dtype == value_dtype
    assert c.rounds == 25


def test_error_feedback_float32_cumulative_mass():
    """Over many rounds, everything sent plus the last residual equals everything fed in
    (up to float32 rounding of the g + e additions; exact per round as above)."""
    c = DGPCompressor()
    sent_sum = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    grad_sum = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for r in range(40):
        g = make_grads(100 + r)
        for acc, x in zip(sent_sum, c.decompress(c.compress(g), g)):
            acc += x.double()
        for acc, x in zip(grad_sum, g):
            acc += x.double()
    for s, e, gsum in zip(sent_sum, c.memory.peek(), grad_sum):
        torch.testing.assert_close(s + e.double(), gsum, rtol=1e-5, atol=1e-6)


def test_payload_is_the_op_band():
    grads = make_grads(1)
    # dense_below=0: the op's band on every layer, the 1-entry one included (empty band).
    p = DGPCompressor(error_feedback=False, dense_below=0).compress(grads)
    for g, layer in zip(grads, p.layers):
        idx, val = dgp_kernels.select(g, 0.05, 0.20)
        assert layer.numel == g.numel()
        assert torch.equal(layer.indices, idx)
        assert torch.equal(layer.values, val)


def test_error_feedback_off_keeps_no_memory_and_first_round_equal():
    grads = make_grads(2)
    a = DGPCompressor(error_feedback=False, dense_below=0)
    b = DGPCompressor(error_feedback=True, dense_below=0)
    pa, pb = a.compress(grads), b.compress(grads)
    assert not a.memory.initialized and b.memory.initialized
    for x, y in zip(pa.layers, pb.layers):  # zero residual: the same first payload
        assert torch.equal(x.indices, y.indices) and torch.equal(x.values, y.values)


def test_grads_are_not_modified():
    grads = make_grads(3)
    before = clone_all(grads)
    c = DGPCompressor()
    for _ in range(3):
        c.compress(grads)
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


def test_float16_saturation_and_inf():
    """A finite value beyond fp16's range is sent as 65504 and the excess stays in the
    residual; inf is sent as inf with nothing left behind."""
    g = [torch.tensor([1.0e5, -7.0e4, 1.0, 0.5, float("inf")], dtype=torch.float32)]
    c = DGPCompressor(top=0.0, keep=1.0, value_dtype="float16")
    p = c.compress(g)
    vals = p.layers[0].values
    assert vals.dtype == torch.float16
    assert vals.float().tolist() == [65504.0, -65504.0, 1.0, 0.5, float("inf")]
    e = c.memory.peek()[0]
    assert e.tolist() == [1.0e5 - 65504.0, -7.0e4 + 65504.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("keep", [0.2, 0.1, 0.37, 1.0])
def test_topk_sends_as_many_values_per_layer_as_dgp(keep):
    top = 0.05 if keep < 0.95 else 0.0
    grads = make_grads(4)
    pd = DGPCompressor(top=top, keep=keep, dense_below=0).compress(grads)
    pt = TopKCompressor(keep=keep).compress(grads)
    for g, a, b in zip(grads, pd.layers, pt.layers):
        assert a.k == b.k == band_counts(g.numel(), top, keep)[1]
    # And topk keeps the largest: its band is the dgp band with top = 0.
    for g, layer in zip(grads, pt.layers):
        idx, _ = dgp_kernels.select(g, 0.0, keep)
        assert torch.equal(layer.indices, idx)


def test_topk_defaults():
    c = get_compressor("topk")
    assert c.error_feedback is False and c.top == 0.0 and c.keep == 0.2
    assert "top" not in c.params()


def test_empty_grads_list():
    for ef in (True, False):
        c = DGPCompressor(error_feedback=ef)
        p = c.compress([])
        assert isinstance(p, SparsePayload) and p.layers == () and p.num_values == 0
        assert c.decompress(p, []) == []


def test_zero_numel_layers():
    grads = [torch.zeros(0), torch.zeros(3, 0), torch.randn(10)]
    c = DGPCompressor()
    for _ in range(2):
        p = c.compress(grads)
        assert [l.numel for l in p.layers] == [0, 0, 10]
        assert [l.k for l in p.layers] == [0, 0, 2]
        assert p.layers[0].indices.dtype == torch.int64
        out = c.decompress(p, grads)
        assert [tuple(t.shape) for t in out] == [(0,), (3, 0), (10,)]


def test_model_change_is_a_clear_error():
    c = DGPCompressor()
    c.compress([torch.randn(4), torch.randn(5)])
    with pytest.raises(ValueError, match=r"grads\[1\] is \(6,\)"):
        c.compress([torch.randn(4), torch.randn(6)])
    with pytest.raises(ValueError, match="residuals for 2 tensors but 1"):
        c.compress([torch.randn(4)])
    with pytest.raises(ValueError, match="float64"):
        c.compress([torch.randn(4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)])
    c.reset()
    c.compress([torch.randn(6)])  # reset forgets the old model


def test_nan_raises_and_leaves_residual_unchanged():
    c = DGPCompressor()
    c.compress([torch.randn(8), torch.randn(8)])
    before = clone_all(c.memory.peek())
    bad = torch.randn(8)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        c.compress([torch.randn(8), bad])
    for a, b in zip(before, c.memory.peek()):
        assert torch.equal(a, b)
    assert c.rounds == 1


def test_bad_grads_argument():
    c = DGPCompressor()
    with pytest.raises(TypeError, match="list or tuple"):
        c.compress(torch.randn(3))
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        c.compress([torch.randn(3), "x"])
    with pytest.raises(TypeError, match="int64"):
        c.compress([torch.arange(3)])


def test_mixed_dtype_model():
    """Layers of different dtypes go through one op call per dtype, in model order."""
    base = make_grads(7, shapes=[(50,), (30,), (20,), (0,)])
    grads = [base[0], base[1].to(torch.bfloat16), base[2], base[3].to(torch.float16)]
    c = DGPCompressor(value_dtype="bfloat16")
    for r in range(3):
        old = clone_all(c.memory.peek()) if c.memory.initialized else [torch.zeros_like(g) for g in grads]
        p = c.compress(grads)
        for g, eo, e, layer, s in zip(grads, old, c.memory.peek(), p.layers, c.decompress(p, grads)):
            assert layer.numel == g.numel()
            assert torch.equal(layer.indices, dgp_kernels.select(g + eo, 0.05, 0.2)[0])
            assert torch.equal(s.to(g.dtype) + e, g + eo)
    before = clone_all(c.memory.peek())
    bad = [grads[0], grads[1].clone(), grads[2], grads[3]]
    bad[1][5] = float("nan")  # NaN in the bf16 group, after the float32 group ran
    with pytest.raises(ValueError, match=r"\[1\] contains NaN"):
        c.compress(bad)
    for a, b in zip(before, c.memory.peek()):
        assert torch.equal(a, b)


def test_empty_round_does_not_fix_the_layout():
    c = DGPCompressor()
    c.compress([])
    c.compress([torch.randn(4)])
    assert len(c.memory) == 1


def test_float32_conservation_is_bitwise():
    """Sent values are bitwise ``v[idx]``; the residual is bitwise ``v`` elsewhere and +0.0
    at the sent positions (so even the sign of zero is accounted for)."""
    c = DGPCompressor(dense_below=0)
    for r in range(20):
        g = make_grads(200 + r)
        old = clone_all(c.memory.peek()) if c.memory.initialized else [torch.zeros_like(x) for x in g]
        p = c.compress(g)
        for x, eo, e, layer in zip(g, old, c.memory.peek(), p.layers):
            v = (x + eo).view(-1)
            expect_e = v.clone()
            expect_e[layer.indices] = 0.0
            assert torch.equal(_bits(layer.values), _bits(v[layer.indices]))
            assert torch.equal(_bits(e.view(-1)), _bits(expect_e))


def test_band_hint_carried_between_rounds_changes_no_bit():
    """The compressor carries a BandHint per group; every round's payload and residuals
    equal those of a compressor whose hint is dropped before each round, and the hint is
    filled (layers above the direct-path size use it)."""
    torch.manual_seed(0)
    shapes = [(200, 200), (50_000,), (7,), (3, 3)]
    base = [torch.randn(s) for s in shapes]
    hinted, fresh = DGPCompressor(), DGPCompressor()
    for step in range(6):
        grads = [b + 0.05 * step * torch.randn_like(b) for b in base]  # drifting
        fresh._hints = {}
        p1, p2 = hinted.compress(grads), fresh.compress(grads)
        for a, b in zip(p1.layers, p2.layers):
            assert torch.equal(a.indices, b.indices) and _bits(a.values).equal(_bits(b.values))
        for e1, e2 in zip(hinted.memory.peek(), fresh.memory.peek()):
            assert _bits(e1).equal(_bits(e2))
    (hint,) = hinted._hints.values()
    assert hint.state is not None and int((hint.state[:, 0] != 0).sum()) >= 2
    hinted.reset()
    assert hinted._hints == {}


@pytest.mark.parametrize("spare", [True, False])
def test_cpu_double_buffer_matches_in_place_op_over_drifting_rounds(spare):
    """float32 CPU groups go through select_ef_multi_into with a spare buffer per tensor
    (where the one-sweep kernels exist, unless ``spare_residuals=False``); every
    round's payload and residuals equal the in-place op without a hint run alongside, the
    memory keeps its tensor objects, and a NaN round changes nothing."""
    torch.manual_seed(1)
    shapes = [(300, 200), (50_000,), (7,), (64, 3, 3, 3)]
    base = [torch.randn(s) for s in shapes]
    comp = DGPCompressor(spare_residuals=spare)
    e_ref = [torch.zeros(s) for s in shapes]
    objs = None
    for step in range(8):
        grads = [0.9 * b + 0.3 * torch.randn_like(b) for b in base]
        base = grads
        payload = comp.compress(grads)
        idx, val, off = dgp_kernels.ops.select_ef_multi(grads, e_ref, comp.top, comp.keep)
        bounds = off.tolist()
        for j, layer in enumerate(payload.layers):
            a, b = bounds[j], bounds[j + 1]
            assert torch.equal(layer.indices, idx[a:b]) and _bits(layer.values).equal(_bits(val[a:b]))
        for e1, e2 in zip(comp.memory.peek(), e_ref):
            assert _bits(e1).equal(_bits(e2))
        if objs is None:
            objs = [id(e) for e in comp.memory.peek()]
        assert [id(e) for e in comp.memory.peek()] == objs
    if spare and dgp_kernels.ops.one_sweep_available(torch.float32):
        (spares,) = comp._spares.values()
        ptrs = {e.data_ptr() for e in comp.memory.peek()}
        assert not ptrs & {s.data_ptr() for s in spares}
    else:  # no one-sweep kernels here, or turned off: the in-place op, no spare buffers
        assert comp._spares == {}
    before = [e.clone() for e in comp.memory.peek()]
    bad = [g.clone() for g in grads]
    bad[1][3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        comp.compress(bad)
    for e1, e2 in zip(comp.memory.peek(), before):
        assert _bits(e1).equal(_bits(e2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_groups_same_bits_with_and_without_spares(dtype):
    """16-bit groups double-buffer too where the one-sweep kernels exist: payloads and
    residuals equal a compressor with ``spare_residuals=False`` round after round."""
    torch.manual_seed(2)
    shapes = [(300, 200), (50_000,), (5,)]
    base = [torch.randn(s) for s in shapes]
    a, b = DGPCompressor(), DGPCompressor(spare_residuals=False)
    for step in range(5):
        base = [0.9 * x + 0.3 * torch.randn_like(x) for x in base]
        grads = [x.to(dtype) for x in base]
        p1, p2 = a.compress(grads), b.compress(grads)
        for l1, l2 in zip(p1.layers, p2.layers):
            assert (l1.indices is None) == (l2.indices is None)
            if l1.indices is not None:
                assert torch.equal(l1.indices, l2.indices)
            assert _bits(l1.values).equal(_bits(l2.values))
        for e1, e2 in zip(a.memory.peek(), b.memory.peek()):
            assert _bits(e1).equal(_bits(e2))
    assert b._spares == {}
    assert (len(a._spares) == 1) == dgp_kernels.ops.one_sweep_available(dtype)
    with pytest.raises(TypeError, match="spare_residuals"):
        DGPCompressor(spare_residuals="no")
