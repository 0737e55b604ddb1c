"""The ``dgp`` compressor's top-band error-feedback policies (``top_feedback``): the
default keeps the authors' bits, ``clipped``/``drop`` keep exact bookkeeping of what they
drop (``decoded + e_new + dropped == g + e_old`` bitwise), on random data with ties,
zeros and infs, in every dtype."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.compressor import get_compressor
from dgp_kernels.compressor.dgp import TOP_FEEDBACK_POLICIES, clip_top_band
from dgp_kernels.ops import band_counts, reference
from dgp_kernels.spec import parse_spec, parse_value

from ._helpers import SHAPES, assert_payloads_equal, make_grads

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _dense(payload, grads):
    out = []
    for layer, g in zip(payload.layers, grads):
        d = torch.zeros(g.numel(), dtype=g.dtype)
        d[layer.indices] = layer.values.to(g.dtype)
        out.append(d)
    return out


def _dropped_dense(comp, grads):
    out = []
    for (idx, drop), g in zip(comp.last_dropped, grads):
        d = torch.zeros(g.numel(), dtype=g.dtype)
        d[idx] = drop
        out.append(d)
    return out


def _with_ties_and_infs(seed, dtype, inf=False):
    gs = make_grads(seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    # A layer of small integers: many exact ties across the top boundary.
    gs.append(torch.randint(-3, 4, (300,), generator=gen).to(dtype))
    t = torch.randn(200, generator=gen).to(dtype)
    if inf:
        t[[5, 17]] = float("inf")
        t[40] = -float("inf")
    gs.append(t)
    return gs


def test_default_is_full_and_matches_reference_bits():
    assert get_compressor("dgp").top_feedback == "full"
    c = get_compressor("dgp", dense_below=0)  # the op's band on every layer, even the empty one
    assert c.top_feedback == "full" and c.params()["top_feedback"] == "full"
    res = [torch.zeros(s) for s in SHAPES]
    for r in range(4):
        gs = make_grads(r)
        p = c.compress(gs)
        for layer, g, e, mine in zip(p.layers, gs, res, c.memory.peek()):
            idx, val = reference.select_ef(g, e, 0.05, 0.2)
            assert torch.equal(layer.indices, idx) and torch.equal(layer.values, val)
            assert torch.equal(mine, e)
    assert c.last_dropped is None and c.dropped_l1 == 0.0 and c.dropped_entries == 0


@pytest.mark.parametrize("policy", ["clipped", "floor", "drop"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inf", [False, True])
def test_bookkeeping_is_bitwise(policy, dtype, inf):
    c = get_compressor("dgp", top_feedback=policy, value_dtype=dtype if dtype != torch.float64 else "float32")
    full = get_compressor("dgp", value_dtype=dtype if dtype != torch.float64 else "float32")
    total_l1 = 0.0
    for r in range(5):
        gs = _with_ties_and_infs(r, dtype, inf=inf and r == 0)
        old = [e.clone() for e in c.memory.peek()] if c.memory.peek() else [torch.zeros_like(g) for g in gs]
        full.memory.load_state_dict({"residuals": old})  # same start: same band as "full"
        p = c.compress(gs)
        pf = full.compress(gs)
        assert_payloads_equal(p, pf)  # the policy never changes what is sent this round
        for i, (g, e0, e1, ef, dec, drop) in enumerate(zip(
                gs, old, c.memory.peek(), full.memory.peek(), _dense(p, gs), _dropped_dense(c, gs))):
            v = g.reshape(-1) + e0.reshape(-1)
            e1, ef = e1.reshape(-1), ef.reshape(-1)
            idx, _ = c.last_dropped[i]
            k_top = band_counts(g.numel(), c.top, c.keep)[0]
            assert idx.numel() == k_top
            assert torch.equal(idx, reference.select(v, 0.0, c.top)[0])
            # Only the top band differs from the authors' residual.
            other = torch.ones(g.numel(), dtype=torch.bool)
            other[idx] = False
            assert torch.equal(e1[other], ef[other]) and torch.equal(drop[other], torch.zeros_like(drop[other]))
            # The identity, per entry: residual + dropped == what the authors would carry.
            assert torch.equal(e1[idx] + drop[idx], ef[idx]), (policy, dtype, i)
            if dtype in (torch.float32, torch.float64) and c.value_dtype == torch.float32:
                assert torch.equal(dec + e1 + drop, v), (policy, dtype, i)
            if policy == "drop":
                assert torch.equal(e1[idx], torch.zeros_like(e1[idx]))
            elif policy == "floor":
                layer = p.layers[i]
                sent_idx = layer.indices if layer.indices is not None else torch.arange(g.numel())
                floor = v[sent_idx].abs().min() if sent_idx.numel() else 0
                assert bool((e1[idx].abs() <= floor).all())
                inside = v[idx].abs() <= floor  # carried whole when already within the floor
                assert torch.equal(e1[idx][inside], v[idx][inside])
            else:
                outside = v.abs()
                outside[idx] = 0
                bound = outside.max() if outside.numel() else 0
                assert bool((e1[idx].abs() <= bound).all())
            total_l1 += float(drop.double().abs().sum())
    assert c.dropped_l1 == pytest.approx(total_l1) or (c.dropped_l1 == total_l1 == float("inf"))
    assert c.dropped_entries > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_top_band_exact_over_exponents(dtype):
    gen = torch.Generator().manual_seed(7)
    fi = torch.finfo(dtype)
    # Magnitudes over the whole range, subnormals and the largest finite included.
    e = torch.randint(-200, 200, (4000,), generator=gen).double()
    t = (torch.randn(4000, generator=gen, dtype=torch.float64) * torch.pow(2.0, e)).to(dtype)
    extra = torch.tensor([fi.max, -fi.max, fi.tiny, fi.tiny * 2 ** -3, 0.0, -0.0, 1.0, -2.0,
                          float("inf"), -float("inf")], dtype=torch.float64).to(dtype)
    t = torch.cat([t, extra])
    for b in [0.0, fi.tiny * 2 ** -2, 1e-30, 1.0, 1.5, 3.0, 1e30, fi.max, float("inf")]:
        bound = torch.tensor(b, dtype=torch.float64).to(dtype)
        c, d = clip_top_band(t, bound)
        assert c.dtype == d.dtype == dtype
        assert bool((c.abs() <= bound).all())
        assert torch.equal(c + d, t)
        assert torch.equal(d[c == t], torch.zeros_like(d[c == t]))
        fin = torch.isfinite(t)
        # t - c is exact: the same in float64.
        assert torch.equal(d[fin].double(), t[fin].double() - c[fin].double())
        # Entries within the bound are carried whole; c keeps the sign of t.
        inside = t.abs() <= bound
        assert torch.equal(c[inside], t[inside])
        assert bool(((c == 0) | (torch.sign(c) == torch.sign(t))).all())
        # Near the bound (|t| <= 2B) the clip is exactly B.
        near = (~inside) & (t.double().abs() <= 2 * bound.double())
        assert torch.equal(c[near].abs(), bound.expand_as(c[near]))
        # inf is clipped to ±B (dropping ±inf) unless B is inf.
        if b != float("inf"):
            assert torch.equal(c[torch.isinf(t)], torch.sign(t[torch.isinf(t)]) * bound)


def test_floor_carries_the_smallest_sent_magnitude():
    g = torch.zeros(100)
    g[:30] = torch.arange(1.0, 31.0)
    g[40] = -50.0
    c = get_compressor("dgp", top_feedback="floor")
    p = c.compress([g])
    # k_top = 5: -50, 30, 29, 28, 27; the band (20 entries) is 26 down to 7.
    assert float(p.layers[0].values.abs().min()) == 7.0
    idx, drop = c.last_dropped[0]
    assert idx.tolist() == [26, 27, 28, 29, 40]
    e = c.memory.peek()[0]
    assert e[idx].tolist() == [7.0, 7.0, 7.0, 7.0, -7.0]
    assert drop.tolist() == [20.0, 21.0, 22.0, 23.0, -43.0]
    # When fresh entries outrank them, the carried 7s are sent from the band next round.
    g2 = torch.zeros(100)
    g2[50:60] = 100.0
    p2 = c.compress([g2])
    assert set(idx.tolist()) <= set(p2.layers[0].indices.tolist())
    clipped = get_compressor("dgp", top_feedback="clipped")
    clipped.compress([g])
    assert clipped.memory.peek()[0][idx].abs().tolist() == [26.0] * 5


def test_inf_in_top_band_is_dropped_and_counted():
    g = torch.zeros(100)
    g[:20] = torch.arange(1.0, 21.0)
    g[3] = float("inf")
    c = get_compressor("dgp", top_feedback="clipped")
    p = c.compress([g])
    idx, drop = c.last_dropped[0]
    # k_top = 5: inf and 20, 19, 18, 17; the boundary is 16 (the largest sent).
    assert float(p.layers[0].values.abs().max()) == 16.0
    e = c.memory.peek()[0]
    assert torch.equal(e[idx], torch.full((5,), 16.0))
    assert drop[idx.tolist().index(3)] == float("inf")
    assert c.dropped_l1 == float("inf") and c.dropped_entries == 5


def test_state_roundtrip_and_reset():
    a = get_compressor("dgp", top_feedback="clipped")
    for r in range(2):
        a.compress(make_grads(r))
    sd = a.state_dict()
    assert sd["params"]["top_feedback"] == "clipped"
    assert sd["extra"]["dropped_entries"] == a.dropped_entries > 0
    b = get_compressor("dgp", top_feedback="clipped")
    b.load_state_dict(sd)
    assert b.dropped_l1 == a.dropped_l1
    assert_payloads_equal(a.compress(make_grads(5)), b.compress(make_grads(5)))
    assert a.dropped_l1 == b.dropped_l1
    with pytest.raises(ValueError, match="top_feedback"):
        get_compressor("dgp", top_feedback="drop").load_state_dict(sd)
    # A state saved before the parameter existed loads into the default policy only.
    old = dict(sd, params={k: v for k, v in sd["params"].items() if k != "top_feedback"})
    get_compressor("dgp").load_state_dict(old)
    with pytest.raises(ValueError, match="top_feedback"):
        get_compressor("dgp", top_feedback="clipped").load_state_dict(old)
    a.reset()
    assert a.dropped_l1 == 0.0 and a.dropped_entries == 0 and a.last_dropped is None


def test_no_effect_without_error_feedback_or_top():
    for kw in (dict(error_feedback=False), dict(top=0.0)):
        c = get_compressor("dgp", top_feedback="drop", **kw)
        f = get_compressor("dgp", **kw)
        for r in range(3):
            assert_payloads_equal(c.compress(make_grads(r)), f.compress(make_grads(r)))
        assert c.dropped_entries == 0


@pytest.mark.parametrize("bad,exc", [("clip", ValueError), ("", ValueError), (1, TypeError), (None, TypeError)])
def test_bad_policy(bad, exc):
    with pytest.raises(exc, match="top_feedback"):
        get_compressor("dgp", top_feedback=bad)


def test_topk_does_not_take_it():
    assert "top_feedback" not in get_compressor("topk").params()
    with pytest.raises(TypeError, match="top_feedback"):
        get_compressor("topk", top_feedback="drop")


@pytest.mark.parametrize("policy", TOP_FEEDBACK_POLICIES)
def test_from_a_defense_spec(policy):
    name, raw = parse_spec(f"dgp:top_feedback={policy}")
    c = get_compressor(name, **{k: parse_value(v) for k, v in raw.items()})
    assert c.top_feedback == policy
