"""``select_ef_multi_into``: error feedback with the new residuals in separate buffers.

The one-sweep path (C++ kernel: every dtype with AVX-512 or AVX2; ``one_sweep_available``)
is what most of these tests force, at each of those levels; the scalar level takes the
copy-and-in-place
path, checked as exact here too.

Whatever the hint holds, indices, values and ``residuals_out`` are bit-identical to the
reference's ``select_ef_multi`` (whose mutated residuals are the expected
``residuals_out``), and ``residuals`` are never written. The C++ kernel's one-sweep path
is forced through the hint: brackets that hold (path ``hint``), a boundary moved past its
window but still in range (``hint_in_range``), too narrow, wrong, too wide, other dtypes
(``hint_miss`` or no hint use), on every dtype, every forced SIMD level, and the
adversarial inputs of the suite. NaN anywhere raises with ``residuals`` and the hint
unchanged.
"""

from __future__ import annotations

import pytest
import torch

import dgp_kernels
from dgp_kernels.ops import reference as ref

from .test_select import (DTYPES, KINDS, _cpp_module, assert_tree_same, clone_keep_layout, cpp_mode,
                          make_values)
from .test_select_hint import BRACKETS, KEY_BITS, _exact_state, _forced, _layers


def _clones(ts):
    return [t.clone() for t in ts]


def _outs(es):
    # Contiguous, filled with a pattern: the op must overwrite every entry.
    return [torch.full(e.shape, 7.0, dtype=e.dtype) for e in es]


def _run_into(gs, es, hint, top=0.05, keep=0.2):
    """The out-of-place call and the reference on clones; asserts bit-identity and that the
    input residuals are untouched; returns the C++ path counts (or None)."""
    _C = _cpp_module()
    e_ref = _clones(es)
    want = ref.select_ef_multi(gs, e_ref, top, keep)
    before = [clone_keep_layout(e) for e in es]
    outs = _outs(es)
    if _C is not None:
        _C.path_counts(True)
    got = dgp_kernels.select_ef_multi_into(gs, es, outs, top, keep, hint=hint)
    counts = _C.path_counts(True) if _C is not None else None
    assert_tree_same(got, want, "select_ef_multi_into")
    assert_tree_same(outs, e_ref, "residuals_out")
    assert_tree_same(es, before, "residuals (read only)")
    return counts


def _simd_levels():
    _C = _cpp_module()
    if _C is None:
        return [None]
    levels = ["scalar", "avx2", "avx512"]
    return levels[: levels.index(_C.simd_best()) + 1]


def _vector_levels():
    return [lv for lv in _simd_levels() if lv in ("avx2", "avx512")] or [None]


@pytest.mark.parametrize("simd", _vector_levels())
@pytest.mark.parametrize("bracket", BRACKETS + ("in_range", "wide_split"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_brackets_are_exact(dtype, bracket, simd):
    with (cpp_mode(simd=simd) if simd else _null()):
        _forced_brackets_case(dtype, bracket)


def _forced_brackets_case(dtype, bracket):
    gs, es = _layers("randn", dtype)
    h = dgp_kernels.BandHint()
    state = _exact_state(gs, es)
    if bracket == "in_range":
        # Exact keys, predicted high key moved up by 5 margins: the hi window misses, but both
        # ranks stay inside [b_lo, a_hi] (the one-sweep path doubles the margins).
        h.state = state.clone()
        h.state[:, 5] = 5 * h.state[:, 3]
        h.state[:, 6] = 0
    elif bracket == "wide_split":
        # Exact keys, each margin a fifth of the band's key span (doubled on this path: the
        # two windows cover 4/5 of it but stay apart).
        h.state = state.clone()
        h.state[:, 3:5] = (state[:, 1] - state[:, 2]).unsqueeze(1) // 5
        h.state[:, 5:] = 0
    else:
        h.state = _forced(bracket, state, dtype)
    counts = _run_into(gs, es, h)
    if counts is None:
        return
    if not dgp_kernels.ops.one_sweep_available(dtype):
        # No vector one-sweep kernels for this dtype / CPU: every layer copies and runs the
        # in-place path (without trying the brackets).
        assert counts["hint"] == 0 and counts["hint_miss"] == 0, counts
        return
    big = 2  # layers 0 and 2 are above the direct path
    if bracket in ("hold", "exact_zero_margin"):
        assert counts["hint"] == big and counts["hint_miss"] == 0, counts
        assert counts["hint_in_range"] == 0, counts
    elif bracket == "in_range":
        assert counts["hint"] == big and counts["hint_in_range"] == big, counts
    elif bracket in ("narrow", "moved_off"):
        # Margins doubled on this path: a bracket just off may still hold.
        assert counts["hint"] + counts["hint_miss"] == big, counts
    elif bracket == "wide_split":  # wide windows: the whole-layer buffers never overflow
        assert counts["hint"] == big and counts["hint_miss"] == 0, counts
    elif bracket in ("wide", "swapped"):
        # Merged brackets (one window holding the whole band) are not tried: those layers
        # copy and run the in-place path.
        assert counts["hint"] == 0 and counts["hint_miss"] == 0, counts
    elif bracket == "other_dtype":
        assert counts["hint"] == 0 and counts["hint_miss"] == 0, counts
    else:  # random / foreign rows: tried unless merged
        assert counts["hint"] + counts["hint_miss"] <= big, counts
    want = _exact_state(gs, _layers("randn", dtype)[1])
    assert torch.equal(h.state[:, :3], want[:, :3])


@pytest.mark.parametrize("simd", _simd_levels())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drifting_steps_every_simd_level(dtype, simd):
    """Consecutive steps with swapped buffers, as a training loop runs them: every step
    bit-identical to the in-place reference; the hint holds once its brackets have narrowed
    (merged ones, while the residuals build up, are not tried)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(300, 200), (1000,), (50_000,), (3, 3)]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    es = [torch.zeros_like(g) for g in gs]
    spare = [torch.empty_like(g) for g in gs]
    e_ref = [torch.zeros_like(g) for g in gs]
    h = dgp_kernels.BandHint()
    held = 0
    with (cpp_mode(simd=simd) if simd else _null()):
        # (Levels without one-sweep kernels for the dtype check that every layer takes the
        # copy-and-in-place path exactly.)
        for step in range(12):
            gs = [(0.9 * g.double() + 0.3 * torch.randn(g.shape, generator=gen, dtype=torch.float64))
                  .to(dtype) for g in gs]
            want = ref.select_ef_multi(gs, e_ref, 0.05, 0.2)
            _C = _cpp_module()
            if _C is not None:
                _C.path_counts(True)
            got = dgp_kernels.select_ef_multi_into(gs, es, spare, hint=h)
            if _C is not None:
                held += _C.path_counts(True)["hint"]
            assert_tree_same(got, want, f"step {step}")
            assert_tree_same(spare, e_ref, f"step {step} residuals_out")
            es, spare = spare, es
    if _cpp_module() is not None and simd is not None:
        with cpp_mode(simd=simd):
            available = dgp_kernels.ops.one_sweep_available(dtype)
        if available:
            assert held >= 4, held


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("simd", _vector_levels())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_inputs_with_held_brackets(dtype, kind, simd):
    """The suite's adversarial inputs (ties across a bracket, many zeros, +-inf, subnormals,
    few distinct values) with brackets from the exact keys: exact whichever path serves, at
    every vector level that has one-sweep kernels."""
    with (cpp_mode(simd=simd) if simd else _null()):
        _adversarial_case(dtype, kind)


def _adversarial_case(dtype, kind):
    gs, es = _layers(kind, dtype, seed=3)
    h = dgp_kernels.BandHint()
    h.state = _forced("hold", _exact_state(gs, es), dtype)
    _run_into(gs, es, h)
    for bracket in ("exact_zero_margin", "swapped", "in_range"):
        h.state = _forced("hold", _exact_state(gs, es), dtype)
        if bracket == "in_range":
            h.state[:, 5] = 5 * h.state[:, 3]
        else:
            h.state = _forced(bracket, h.state, dtype)
        _run_into(gs, es, h)


@pytest.mark.parametrize("simd", _vector_levels())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_hint_and_split_chunks(dtype, simd):
    """No hint (copy path); and two threads, where a big layer is split into chunks."""
    with (cpp_mode(simd=simd) if simd else _null()):
        _split_chunks_case(dtype)


def _split_chunks_case(dtype):
    gs, es = _layers("wide", dtype, seed=4)
    _run_into(gs, es, None)
    big = [make_values("randn", 300_000, dtype, seed=5)]
    be = [make_values("randn", 300_000, dtype, seed=6) * 0.5]
    h = dgp_kernels.BandHint()
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(3):
            _run_into(big, be, h)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("simd", _vector_levels())
@pytest.mark.parametrize("where", ["g_first", "g_last", "e_big", "e_small", "sum_inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_raises_residuals_and_hint_unchanged(dtype, where, simd):
    with (cpp_mode(simd=simd) if simd else _null()):
        _nan_case(dtype, where)


def _nan_case(dtype, where):
    gs, es = _layers("randn", dtype, seed=7)
    h = dgp_kernels.BandHint()
    h.state = _forced("hold", _exact_state(gs, es), dtype)
    layer = {"g_first": 0, "g_last": 2, "e_big": 2, "e_small": 1, "sum_inf": 0}[where]
    if where.startswith("g"):
        gs[layer].view(-1)[0 if where == "g_first" else -1] = float("nan")
    elif where.startswith("e"):
        es[layer].view(-1)[17] = float("nan")
    else:  # inf - inf
        gs[layer].view(-1)[5] = float("inf")
        es[layer].view(-1)[5] = float("-inf")
    before_e, before_h = _clones(es), h.state.clone()
    outs = _outs(es)
    with pytest.raises(ValueError, match=rf"gs\[{layer}\] \+ residuals\[{layer}\] contains NaN"):
        dgp_kernels.select_ef_multi_into(gs, es, outs, hint=h)
    assert_tree_same(es, before_e, "residuals after NaN")
    assert torch.equal(h.state, before_h)


def test_bad_arguments():
    g = [torch.randn(100), torch.randn(50_000)]
    e = [torch.zeros_like(t) for t in g]
    o = [torch.empty_like(t) for t in g]
    with pytest.raises(ValueError, match="residuals_out has 1 tensors but gs has 2"):
        dgp_kernels.select_ef_multi_into(g, e, o[:1])
    with pytest.raises(ValueError, match=r"residuals_out\[1\] must match its gradient"):
        dgp_kernels.select_ef_multi_into(g, e, [o[0], torch.empty(3)])
    with pytest.raises(TypeError, match=r"residuals_out\[0\] must be a torch.Tensor"):
        dgp_kernels.select_ef_multi_into(g, e, [1.0, o[1]])
    with pytest.raises(TypeError, match="hint must be a dgp_kernels.BandHint"):
        dgp_kernels.select_ef_multi_into(g, e, o, hint=3)
    if _cpp_module() is None:
        return
    strided = torch.empty(100, 2)[:, 0]
    with pytest.raises(ValueError, match=r"residuals_out\[0\] must be contiguous"):
        dgp_kernels.select_ef_multi_into(g, e, [strided, o[1]])
    for bad, other in (([e[0], o[1]], "residuals"), ([g[0], o[1]], "gs"), ([o[1][:100], o[1]], "residuals_out")):
        with pytest.raises(ValueError, match=rf"overlaps {other}\["):
            dgp_kernels.select_ef_multi_into(g, e, bad)


def test_opcheck():
    gs = [make_values("randn", 300, torch.float32).reshape(3, 100),
          make_values("randn", 40_000, torch.float32, seed=1)]
    rs = [make_values("randn", t.numel(), t.dtype, seed=2).reshape(t.shape) for t in gs]
    outs = [torch.empty_like(t) for t in gs]
    h = dgp_kernels.BandHint()
    dgp_kernels.select_ef_multi(gs, _clones(rs), hint=h)
    torch.library.opcheck(torch.ops.dgp.select_ef_multi_into, (gs, rs, outs, h.state, 0.05, 0.2))
    torch.library.opcheck(torch.ops.dgp.select_ef_multi_into,
                          ([torch.empty(0)], [torch.empty(0)], [torch.empty(0)],
                           torch.zeros(1, 7, dtype=torch.int64), 0.05, 0.2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    """Strided gradients and residuals are read through contiguous copies; residuals_out
    (contiguous) still receive the exact new residuals."""
    g0 = make_values("randn", 80_000, dtype, seed=8).reshape(200, 400)
    gs = [g0.t(), make_values("randn", 40_000, dtype, seed=9)]
    e_full = make_values("randn", 160_000, dtype, seed=10).reshape(400, 400) * 0.5
    es = [e_full[:, ::2], make_values("randn", 40_000, dtype, seed=11) * 0.5]  # 400 x 200, strided
    h = dgp_kernels.BandHint()
    for _ in range(3):  # first call fills the hint, later ones take the one-sweep path
        _run_into(gs, es, h)


def test_one_sweep_available():
    _C = _cpp_module()
    for dt in DTYPES:
        want = _C is not None and _C.simd_level() in ("avx2", "avx512")
        assert dgp_kernels.ops.one_sweep_available(dt) is want
        assert dgp_kernels.ops.one_sweep_available(dt, "meta") is False
    if _C is not None and _C.simd_best() in ("avx2", "avx512"):
        with cpp_mode(simd="avx2"):
            for dt in DTYPES:
                assert dgp_kernels.ops.one_sweep_available(dt) is True
        with cpp_mode(simd="scalar"):
            for dt in DTYPES:
                assert dgp_kernels.ops.one_sweep_available(dt) is False
