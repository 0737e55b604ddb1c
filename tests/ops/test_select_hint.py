"""BandHint: the steady-state brackets of ``select_ef_multi`` / ``select_ef`` (``hint=``).

Whatever a hint holds, results are bit-identical to the reference; only the path taken
(``_C.path_counts``: ``hint`` when both brackets held, ``hint_miss`` when the layer fell
back) depends on it. Brackets are forced here: exact keys with their margins (hold), zero
margins around the exact keys (hold, narrowest), zero margins one key off (too narrow),
the whole key range (too wide: candidate buffers overflow), swapped or foreign keys
(wrong), random int64 rows, and rows written for another dtype (ignored).
"""

from __future__ import annotations

import pytest
import torch

import dgp_kernels
from dgp_kernels.ops import reference as ref

from .test_select import DTYPES, KINDS, _cpp_module, assert_tree_same, cpp_mode, make_values

N = 40_000  # above the direct path's 2^15 entries (kDirectMax): the hint applies
KEY_BITS = {torch.float32: 31, torch.float64: 63, torch.float16: 15, torch.bfloat16: 15}


def _layers(kind: str, dtype: torch.dtype, seed: int = 0):
    gs = [make_values(kind, N, dtype, seed=seed).reshape(200, 200),
          make_values("randn", 1000, dtype, seed=seed + 1),  # direct path: hint unused
          make_values(kind, N + 7, dtype, seed=seed + 2)]
    es = [make_values("randn", g.numel(), dtype, seed=seed + 10 + i).reshape(g.shape) * 0.5
          for i, g in enumerate(gs)]
    return gs, es


def _clones(ts):
    return [t.clone() for t in ts]


def _run(gs, es, hint, top=0.05, keep=0.2):
    """The hinted call and the reference on clones; asserts bit-identity, returns the
    path counts of the hinted call (C++ kernel) or None."""
    _C = _cpp_module()
    e_ref = _clones(es)
    want = ref.select_ef_multi(gs, e_ref, top, keep)
    if _C is not None:
        _C.path_counts(True)
    got = dgp_kernels.select_ef_multi(gs, es, top, keep, hint=hint)
    counts = _C.path_counts(True) if _C is not None else None
    assert_tree_same(got, want, "select_ef_multi(hint=...)")
    assert_tree_same(es, e_ref, "residuals")
    return counts


def _exact_state(gs, es, top=0.05, keep=0.2) -> torch.Tensor:
    """The hint state a call on (clones of) these inputs leaves: exact keys + margins."""
    h = dgp_kernels.BandHint()
    dgp_kernels.select_ef_multi(gs, _clones(es), top, keep, hint=h)
    return h.state.clone()


def _forced(kind_of_bracket: str, state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = state.clone()
    kmax = (1 << KEY_BITS[dtype]) - 1
    if kind_of_bracket == "hold":
        s[:, 5:] = 0  # centred on the exact keys
    elif kind_of_bracket == "exact_zero_margin":
        s[:, 3:] = 0
    elif kind_of_bracket == "narrow":  # one key unit off, no margin
        s[:, 1] += 1
        s[:, 2] -= 1
        s[:, 3:] = 0
    elif kind_of_bracket == "moved_off":  # exact keys, but a predicted move past the margin
        s[:, 5] = s[:, 3] + 1
        s[:, 6] = -(s[:, 4] + 1)
    elif kind_of_bracket == "wide":  # every key is a candidate
        s[:, 1:3] = kmax // 2
        s[:, 3:] = kmax
    elif kind_of_bracket == "swapped":  # merged into one range [klo, khi]: holds or overflows
        s[:, 1], s[:, 2] = state[:, 2].clone(), state[:, 1].clone()
        s[:, 3:] = 0
    elif kind_of_bracket == "foreign":  # another layer's row, shifted
        s = s.roll(1, 0)
        s[:, 0] = KEY_BITS[dtype]
    elif kind_of_bracket == "random":
        gen = torch.Generator().manual_seed(7)
        s[:, 1:] = torch.randint(-(1 << 62), 1 << 62, (s.shape[0], 6), generator=gen)
    elif kind_of_bracket == "other_dtype":
        s[:, 0] = 31 if KEY_BITS[dtype] != 31 else 15
    else:
        raise AssertionError(kind_of_bracket)
    return s


BRACKETS = ("hold", "exact_zero_margin", "narrow", "moved_off", "wide", "swapped", "foreign",
            "random", "other_dtype")


@pytest.mark.parametrize("bracket", BRACKETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_brackets_are_exact(dtype, bracket):
    """Every forced bracket on randn layers: exact, and the path taken is the expected one."""
    gs, es = _layers("randn", dtype)
    h = dgp_kernels.BandHint()
    h.state = _forced(bracket, _exact_state(gs, es), dtype)
    before = h.state.clone()
    counts = _run(gs, es, h)
    if counts is None:  # the reference backend ignores the hint
        assert torch.equal(h.state, before)
        return
    big = 2  # layers 0 and 2 are above the direct path
    if bracket in ("hold", "exact_zero_margin"):
        assert counts["hint"] == big and counts["hint_miss"] == 0, counts
    elif bracket in ("narrow", "moved_off", "wide"):
        assert counts["hint"] == 0 and counts["hint_miss"] == big, counts
    elif bracket == "other_dtype":
        assert counts["hint"] == 0 and counts["hint_miss"] == 0, counts
    else:
        assert counts["hint"] + counts["hint_miss"] == big, counts
    # After the call the state holds this input's exact keys again.
    want = _exact_state(gs, _layers("randn", dtype)[1])
    assert torch.equal(h.state[:, :3], want[:, :3])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_inputs_with_holding_and_wrong_brackets(dtype, kind):
    """The adversarial inputs of the main suite (ties across a bracket, many zeros, ±inf,
    subnormals in every format, random bit patterns) under brackets that hold and brackets
    one key off: exact either way."""
    gs, es = _layers(kind, dtype, seed=3)
    exact = _exact_state(gs, es)
    for bracket in ("hold", "exact_zero_margin", "narrow", "random"):
        h = dgp_kernels.BandHint()
        h.state = _forced(bracket, exact, dtype)
        _run(_clones(gs), _clones(es), h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_across_a_bracket_edge(dtype):
    """A tie group straddling both boundary ranks and a bracket edge exactly at the tie's
    key: the tie ordinals must come out of the bracketed count as from the other paths."""
    gs, es = _layers("band_tie", dtype, seed=5)
    es = [torch.zeros_like(e) for e in es]  # keep the ties of g intact in g + e
    exact = _exact_state(gs, es)
    for margins in ((0, 0), (1, 0), (0, 1), (3, 3)):
        h = dgp_kernels.BandHint()
        h.state = exact.clone()
        h.state[:, 3], h.state[:, 4] = margins
        h.state[:, 5:] = 0
        _run(_clones(gs), _clones(es), h)


def test_simd_levels_with_hint():
    """The bracketed count sweep of every SIMD level (forced) on every dtype."""
    _C = _cpp_module()
    if _C is None:
        pytest.skip("needs the C++ kernel")
    levels = ["scalar", "avx2", "avx512"]
    for simd in levels[: levels.index(_C.simd_best()) + 1]:
        for dtype in DTYPES:
            gs, es = _layers("randn", dtype, seed=9)
            exact = _exact_state(gs, es)
            for bracket in ("hold", "narrow"):
                h = dgp_kernels.BandHint()
                h.state = _forced(bracket, exact, dtype)
                with cpp_mode(simd=simd):
                    counts = _run(_clones(gs), _clones(es), h)
                key = "hint" if bracket == "hold" else "hint_miss"
                assert counts[key] == 2, (simd, dtype, bracket, counts)


def test_nan_raises_and_changes_nothing():
    """A NaN in any layer: ValueError naming it; residuals and the hint are unchanged."""
    for dtype in DTYPES:
        gs, es = _layers("randn", dtype)
        h = dgp_kernels.BandHint()
        h.state = _exact_state(gs, es)
        gs[2] = gs[2].clone()
        gs[2][123] = float("nan")
        e_before, s_before = _clones(es), h.state.clone()
        with pytest.raises(ValueError, match=r"gs\[2\]"):
            dgp_kernels.select_ef_multi(gs, es, hint=h)
        assert_tree_same(es, e_before, "residuals after NaN")
        assert torch.equal(h.state, s_before), "hint after NaN"
        # inf - inf in g + residual is a NaN too
        gs[2][123] = float("inf")
        es[2][123] = float("-inf")
        e_before = _clones(es)
        with pytest.raises(ValueError, match=r"gs\[2\]"):
            dgp_kernels.select_ef_multi(gs, es, hint=h)
        assert_tree_same(es, e_before, "residuals after inf - inf")
        assert torch.equal(h.state, s_before), "hint after inf - inf"


def test_steady_state_loop_hits_and_stays_exact():
    """Consecutive error-feedback steps with drifting gradients (each entry an AR(1)
    process, correlation 0.9 step to step): every step exact, and once the margins have
    adapted the hinted path serves most layer-steps."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(300, 200), (50_000,), (64,), (40_000,)]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    es = [torch.zeros(s) for s in shapes]
    h = dgp_kernels.BandHint()
    hits = misses = 0
    for step in range(16):
        gs = [0.9 * g + 0.4359 * torch.randn(g.shape, generator=gen) for g in gs]
        counts = _run(gs, es, h)
        if counts is not None and step >= 8:
            hits += counts["hint"]
            misses += counts["hint_miss"]
    if _cpp_module() is not None:
        assert hits > 2 * misses, (hits, misses)


def test_two_threads_match_one_thread_with_hint():
    """A layer large enough to be split across threads (analysed by all of them, the
    bracketed sweep in parallel chunks), and a list of several split layers (each analysed
    whole on one thread): the same bits and the same hint at 1 and 2 threads."""
    big = [make_values("randn", 300_000, torch.float32, seed=21)]
    several = [make_values("band_tie", 270_000, torch.float32, seed=22),
               make_values("randn", 280_000, torch.float32, seed=23),
               make_values("randn", 290_000, torch.float32, seed=24),
               make_values("wide", 5000, torch.float32, seed=25)]
    saved = torch.get_num_threads()
    try:
        for gs in (big, several):
            es = [make_values("randn", g.numel(), g.dtype, seed=30) for g in gs]
            exact = _exact_state(gs, es)
            outs, states = [], {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for bracket in ("hold", "narrow"):
                    h = dgp_kernels.BandHint()
                    h.state = _forced(bracket, exact, torch.float32)
                    e = _clones(es)
                    outs.append((dgp_kernels.select_ef_multi(gs, e, hint=h), e))
                    states.setdefault(bracket, []).append(h.state)
            torch.set_num_threads(1)
            for o in outs[1:]:
                assert_tree_same(o, outs[0], "hinted, 1 vs 2 threads")
            for bracket, (one, two) in states.items():
                assert torch.equal(one, two), f"hint state after {bracket}, 1 vs 2 threads"
            _run(_clones(gs), _clones(es), dgp_kernels.BandHint())
    finally:
        torch.set_num_threads(saved)


def test_select_ef_hint_matches_reference():
    """The single-tensor wrapper with a hint (a one-layer state), over a few steps."""
    g0 = make_values("randn", 60_000, torch.bfloat16, seed=2)
    e, e_ref = torch.zeros_like(g0), torch.zeros_like(g0)
    h = dgp_kernels.BandHint()
    for step in range(4):
        g = (g0.float() * (1 + 0.01 * step)).to(torch.bfloat16)
        want = ref.select_ef(g, e_ref)
        got = dgp_kernels.select_ef(g, e, hint=h)
        assert_tree_same(got, want, f"select_ef(hint) step {step}")
        assert_tree_same(e, e_ref, f"residual step {step}")
    assert h.state is not None and h.state.shape == (1, 7)


def test_hint_state_follows_the_layer_count():
    h = dgp_kernels.BandHint()
    assert repr(h) == "BandHint(empty)"
    gs, es = _layers("randn", torch.float32)
    _run(gs, es, h)
    assert h.state.shape == (3, 7)
    _run(gs[:2], es[:2], h)  # another list: a fresh state
    assert h.state.shape == (2, 7)
    h.reset()
    assert h.state is None


def test_bad_hints_raise_and_change_nothing():
    gs, es = _layers("randn", torch.float32)
    before = _clones(es)
    with pytest.raises(TypeError, match="hint must be a dgp_kernels.BandHint"):
        dgp_kernels.select_ef_multi(gs, es, hint=torch.zeros(3, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="hint must be a dgp_kernels.BandHint"):
        dgp_kernels.select_ef(gs[0], es[0], hint="yes")
    if _cpp_module() is not None:
        op = torch.ops.dgp.select_ef_multi_hint
        with pytest.raises(TypeError, match="hint must be an int64 tensor"):
            op(gs, es, torch.zeros(3, 7), 0.05, 0.2)
        with pytest.raises(ValueError, match=r"hint must be a contiguous CPU tensor of shape \[3, 7\]"):
            op(gs, es, torch.zeros(2, 7, dtype=torch.int64), 0.05, 0.2)
        with pytest.raises(ValueError, match="not contiguous"):
            op(gs, es, torch.zeros(7, 3, dtype=torch.int64).t(), 0.05, 0.2)
    assert_tree_same(es, before, "residuals after bad hints")


def test_opcheck_select_ef_multi_hint():
    gs, es = _layers("randn", torch.float32)
    hint = _exact_state(gs, es)
    torch.library.opcheck(torch.ops.dgp.select_ef_multi_hint, (gs, es, hint, 0.05, 0.2))
