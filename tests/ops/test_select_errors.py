"""Bad input to the band-selection ops: a clear error naming the argument, nothing modified.

Every case runs through the public wrappers (``dgp_kernels.select`` ..., which must raise
``ValueError``/``TypeError``) and through the raw ``torch.ops.dgp.*`` ops (whose kernels
repeat the checks; ``TORCH_CHECK_VALUE``/``TYPE`` surface as ``ValueError``/``TypeError``,
schema mismatches as ``RuntimeError``). In both cases the message must name the argument,
and every tensor argument (residuals, and ``g`` of ``prune_``) must be bitwise unchanged
afterwards, including the whole storage of sliced views.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, List

import pytest
import torch

import dgp_kernels

from .test_select import DTYPE_IDS, DTYPES, _cpp_modes, _full_storage, bits, cpp_mode, make_values

RAW_EXC = (ValueError, TypeError, RuntimeError)
# The default kernel path plus every forced C++ path (SIMD levels, radix without sampling):
# large-tensor NaN checks run under each, since each has its own first sweep.
MODES = [("default", {})] + [(name, kw) for name, kw, _, _ in _cpp_modes()]
NAN = math.nan
INF = math.inf


def _wrapper(op: str, *args: Any) -> Any:
    return getattr(dgp_kernels, op)(*args)


def _raw(op: str, *args: Any) -> Any:
    return getattr(torch.ops.dgp, op)(*args)


@pytest.fixture(params=["wrapper", "raw"])
def caller(request):
    return request.param


def _snapshot(args) -> List[tuple]:
    out = []
    for a in args:
        ts = [a] if isinstance(a, torch.Tensor) else (list(a) if isinstance(a, (list, tuple)) else [])
        for t in ts:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                out.append((t, bits(_full_storage(t)).clone()))
    return out


def expect_error(caller: str, exc: type, pattern: str, op: str, *args: Any) -> str:
    """Call ``op``; require ``exc`` (wrapper) or any of RAW_EXC (raw op) with ``pattern`` in
    the message, and every tensor argument unchanged. Returns the message."""
    before = _snapshot(args)
    fn: Callable = _wrapper if caller == "wrapper" else _raw
    expected = exc if caller == "wrapper" else RAW_EXC
    with pytest.raises(expected) as info:
        fn(op, *args)
    msg = str(info.value)
    assert re.search(pattern, msg), f"{caller} {op}: message {msg!r} does not match {pattern!r}"
    for t, b in before:
        assert torch.equal(bits(_full_storage(t)), b), f"{caller} {op}: a tensor argument was modified"
    return msg


# --------------------------------------------------------------------------------------
# NaN anywhere.
# --------------------------------------------------------------------------------------
NAN_POSITIONS = (0, 17, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pos", NAN_POSITIONS)
def test_nan_in_g(caller, dtype, pos):
    g = make_values("randn", 40, dtype, seed=1).reshape(5, 8)
    g.view(-1)[pos] = NAN
    e = make_values("randn", 40, dtype, seed=2).reshape(5, 8)
    expect_error(caller, ValueError, r"\bg\b.*NaN", "select", g, 0.05, 0.2)
    expect_error(caller, ValueError, r"\bg\b.*NaN", "prune", g, 0.05, 0.2)
    expect_error(caller, ValueError, r"\bg\b.*NaN", "prune_", g, 0.05, 0.2)
    expect_error(caller, ValueError, r"\bg\b.*NaN", "select_ef", g, e, 0.05, 0.2)
    # Also when NaN sits in a non-contiguous view (the gaps are finite).
    big = make_values("randn", 400, dtype, seed=3).reshape(20, 20)
    big[4, 6] = NAN
    view = big.t()[::2]
    expect_error(caller, ValueError, r"\bg\b.*NaN", "prune_", view, 0.05, 0.2)
    expect_error(caller, ValueError, r"\bg\b.*NaN", "select", big[3:6, 5:8], 0.0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pos", NAN_POSITIONS)
def test_nan_in_residual(caller, dtype, pos):
    g = make_values("randn", 40, dtype, seed=1).reshape(8, 5)
    e = make_values("randn", 40, dtype, seed=2).reshape(8, 5)
    e.view(-1)[pos] = NAN
    expect_error(caller, ValueError, r"residual.*NaN", "select_ef", g, e, 0.05, 0.2)
    e_view = make_values("randn", 80, dtype, seed=4).reshape(8, 10)[:, ::2]
    e_view[7, 4] = NAN
    expect_error(caller, ValueError, r"residual.*NaN", "select_ef", g, e_view, 0.05, 0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inf_minus_inf_is_nan(caller, dtype):
    g = make_values("randn", 50, dtype, seed=1)
    e = torch.zeros_like(g)
    g[10], e[10] = INF, -INF
    expect_error(caller, ValueError, r"residual.*NaN", "select_ef", g, e, 0.05, 0.2)
    # Overflow alone is not an error: max + max = inf ranks highest.
    big = torch.finfo(dtype).max
    g2, e2 = g.clone(), torch.zeros_like(g)
    g2[10], e2[10] = big, big
    _wrapper("select_ef", g2, e2, 0.05, 0.2) if caller == "wrapper" else _raw("select_ef", g2, e2, 0.05, 0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_in_list_names_the_layer(caller, dtype):
    gs = [make_values("randn", n, dtype, seed=n).reshape(s) for n, s in ((12, (3, 4)), (0, (0,)), (30, (30,)), (7, (7,)))]
    gs[2][29] = NAN
    rs = [make_values("randn", g.numel(), dtype, seed=9).reshape(g.shape) for g in gs]
    expect_error(caller, ValueError, r"gs\[2\].*NaN", "select_multi", gs, 0.05, 0.2)
    expect_error(caller, ValueError, r"gs\[2\]", "select_ef_multi", gs, rs, 0.05, 0.2)
    gs[2][29] = 1.0
    rs[3][0] = NAN
    expect_error(caller, ValueError, r"residuals\[3\]", "select_ef_multi", gs, rs, 0.05, 0.2)
    rs[3][0], gs[3][0], rs[3][6] = 0.0, INF, -INF
    gs[3][6] = INF
    expect_error(caller, ValueError, r"residuals\[3\]", "select_ef_multi", gs, rs, 0.05, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_nan_only_in_last_layer_leaves_every_residual_untouched(caller, dtype, mode):
    """Large layers first (a kernel that fuses g + e into its first sweep must not have
    written any residual when the last layer turns out to hold a NaN)."""
    with cpp_mode(**mode[1]):
        _nan_in_last_layer(caller, dtype)


def _nan_in_last_layer(caller, dtype):
    gs = [make_values("randn", n, dtype, seed=n) for n in (300_000, 1000, 0, 70_000, 50)]
    gs[1] = gs[1].reshape(10, 100).t()  # non-contiguous layer
    rs = [make_values("randn", g.numel(), dtype, seed=7).reshape(g.shape) for g in gs]
    rs[3] = make_values("randn", 140_000, dtype, seed=8)[::2]  # strided residual
    gs[-1][-1] = NAN
    expect_error(caller, ValueError, r"gs\[4\]", "select_ef_multi", gs, rs, 0.05, 0.2)
    gs[-1][-1] = 0.0
    rs[-1][-1] = NAN
    expect_error(caller, ValueError, r"residuals\[4\]", "select_ef_multi", gs, rs, 0.05, 0.2)


@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_nan_at_the_end_of_a_large_tensor(caller, mode):
    with cpp_mode(**mode[1]):
        _nan_at_the_end(caller)


def _nan_at_the_end(caller):
    g = make_values("randn", 1_000_003, torch.float32, seed=1)
    e = make_values("randn", 1_000_003, torch.float32, seed=2)
    g[-1] = NAN
    expect_error(caller, ValueError, r"\bg\b.*NaN", "select_ef", g, e, 0.05, 0.2)
    expect_error(caller, ValueError, r"\bg\b.*NaN", "prune_", g, 0.05, 0.2)
    g[-1] = 1.0
    e[-1] = NAN
    expect_error(caller, ValueError, r"residual.*NaN", "select_ef", g, e, 0.05, 0.2)


# --------------------------------------------------------------------------------------
# Fractions.
# --------------------------------------------------------------------------------------
def _all_ops_args(top, keep):
    g = make_values("randn", 60, torch.float32, seed=1).reshape(6, 10)
    e = make_values("randn", 60, torch.float32, seed=2).reshape(6, 10)
    return [
        ("select", (g, top, keep)),
        ("prune", (g, top, keep)),
        ("prune_", (g.clone(), top, keep)),
        ("select_ef", (g, e.clone(), top, keep)),
        ("select_multi", ([g, g[0]], top, keep)),
        ("select_ef_multi", ([g, g[0]], [e.clone(), e[1].clone()], top, keep)),
    ]


BAD_FRACTIONS = [
    (-0.1, 0.2, "top", "-0.1"),
    (1.5, 0.0, "top", "1.5"),
    (NAN, 0.2, "top", "nan"),
    (INF, 0.2, "top", "inf"),
    (-INF, 0.2, "top", "inf"),
    (0.05, -1e-9, "keep", "-1e-09"),
    (0.0, 1.0000001, "keep", "1.0000001"),
    (0.05, NAN, "keep", "nan"),
    (0.05, INF, "keep", "inf"),
    (0.6, 0.5, r"top \+ keep", "1.1"),
    (0.5, 0.5 + 1e-6, r"top \+ keep", "0.500001"),
    (0.5, 0.5000001, r"top \+ keep", "0.5000001"),
]


@pytest.mark.parametrize("top,keep,name,value", BAD_FRACTIONS, ids=[f"{a}-{b}" for a, b, _, _ in BAD_FRACTIONS])
def test_bad_fractions(caller, top, keep, name, value):
    for op, args in _all_ops_args(top, keep):
        msg = expect_error(caller, ValueError, name, op, *args)
        assert value in msg, f"{op}: message {msg!r} does not show the value {value}"


@pytest.mark.parametrize("top,keep", [(0.7, 0.3), (0.3, 0.7), (0.1, 0.9), (0.9, 0.1), (1.0, 0.0),
                                      (0.0, 1.0), (0.0, 0.0), (1 / 3, 2 / 3), (0.6, 0.4)])
def test_fractions_summing_to_one_pass(caller, top, keep):
    fn = _wrapper if caller == "wrapper" else _raw
    for op, args in _all_ops_args(top, keep):
        fn(op, *args)


@pytest.mark.parametrize("bad", ["0.1", None, [0.1], 1j])
def test_non_float_fraction(caller, bad):
    g = torch.randn(10)
    for pos, name in ((1, "top"), (2, "keep")):
        args = [g, 0.05, 0.2]
        args[pos] = bad
        expect_error(caller, TypeError, name, "select", *args)
        ef_args = [g, torch.zeros(10), 0.05, 0.2]
        ef_args[pos + 1] = bad
        expect_error(caller, TypeError, name, "select_ef", *ef_args)


def test_wrapper_rejects_bool_and_tensor_fractions():
    g, e = torch.randn(10), torch.zeros(10)
    for bad in (True, torch.tensor(0.1)):
        expect_error("wrapper", TypeError, "top", "select", g, bad, 0.2)
        expect_error("wrapper", TypeError, "keep", "select_ef", g, e, 0.05, bad)


# --------------------------------------------------------------------------------------
# Dtypes, types, residual mismatches, lists.
# --------------------------------------------------------------------------------------
BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_unsupported_dtype(caller, dtype):
    g = torch.ones(12, dtype=dtype)
    f = torch.randn(12)
    expect_error(caller, TypeError, r"\bg\b.*dtype", "select", g, 0.05, 0.2)
    expect_error(caller, TypeError, r"\bg\b.*dtype", "prune", g, 0.05, 0.2)
    expect_error(caller, TypeError, r"\bg\b.*dtype", "prune_", g.clone(), 0.05, 0.2)
    expect_error(caller, TypeError, r"\bg\b.*dtype", "select_ef", g, g.clone(), 0.05, 0.2)
    expect_error(caller, TypeError, r"gs\[1\].*dtype", "select_multi", [f, g], 0.05, 0.2)
    expect_error(caller, TypeError, r"gs\[0\].*dtype", "select_ef_multi", [g, f], [g.clone(), f.clone()], 0.05, 0.2)
    # A float gradient with a residual of this dtype.
    expect_error(caller, ValueError, "residual", "select_ef", f, torch.zeros(12, dtype=dtype), 0.05, 0.2)


def test_non_tensor_arguments():
    g = torch.randn(10)
    expect_error("wrapper", TypeError, r"\bg\b", "select", [1.0, 2.0], 0.05, 0.2)
    expect_error("wrapper", TypeError, r"\bg\b", "prune_", 3.0, 0.05, 0.2)
    expect_error("wrapper", TypeError, "residual", "select_ef", g, [0.0] * 10, 0.05, 0.2)
    expect_error("wrapper", TypeError, r"\bgs\b", "select_multi", g, 0.05, 0.2)
    expect_error("wrapper", TypeError, r"gs\[1\]", "select_multi", [g, 1.0], 0.05, 0.2)
    expect_error("wrapper", TypeError, "residuals", "select_ef_multi", [g], torch.zeros(10), 0.05, 0.2)
    expect_error("wrapper", TypeError, r"residuals\[0\]", "select_ef_multi", [g], [None], 0.05, 0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_residual_mismatch(caller, dtype):
    g = make_values("randn", 12, dtype, seed=1).reshape(3, 4)
    other = torch.float64 if dtype != torch.float64 else torch.float32
    for e in (torch.zeros(12, dtype=dtype), torch.zeros(4, 3, dtype=dtype), torch.zeros(3, 5, dtype=dtype)[:, :3],
              torch.zeros(3, 4, dtype=other), torch.zeros(1, 3, 4, dtype=dtype)):
        expect_error(caller, ValueError, "residual", "select_ef", g, e, 0.05, 0.2)
        expect_error(caller, ValueError, r"residuals\[1\]", "select_ef_multi", [g, g], [torch.zeros_like(g), e], 0.05, 0.2)


def test_residual_on_another_device_wrapper():
    # The raw op dispatches on the residual's device key (Meta here), so only the wrapper
    # can see this one on a CPU-only machine.
    g = torch.randn(3, 4)
    expect_error("wrapper", ValueError, "residual.*device", "select_ef", g, torch.zeros(3, 4, device="meta"), 0.05, 0.2)
    expect_error("wrapper", ValueError, r"residuals\[0\]", "select_ef_multi", [g], [torch.zeros(3, 4, device="meta")], 0.05, 0.2)


@pytest.mark.cuda
def test_residual_on_another_device_cuda(caller):
    g = torch.randn(3, 4)
    expect_error(caller, (ValueError, RuntimeError), "residual|device", "select_ef", g, torch.zeros(3, 4, device="cuda"), 0.05, 0.2)


def test_lists_of_different_lengths(caller):
    gs = [torch.randn(3), torch.randn(4)]
    expect_error(caller, ValueError, r"residuals.*gs|gs.*residuals", "select_ef_multi", gs, [torch.zeros(3)], 0.05, 0.2)
    expect_error(caller, ValueError, r"residuals.*gs|gs.*residuals", "select_ef_multi", gs,
                 [torch.zeros(3), torch.zeros(4), torch.zeros(5)], 0.05, 0.2)
    expect_error(caller, ValueError, r"residuals.*gs|gs.*residuals", "select_ef_multi", [], [torch.zeros(3)], 0.05, 0.2)


def test_lists_of_mixed_dtypes(caller):
    a, b = torch.randn(3), torch.randn(4, dtype=torch.float64)
    expect_error(caller, ValueError, r"gs\[1\]", "select_multi", [a, b], 0.05, 0.2)
    expect_error(caller, ValueError, r"gs\[1\]", "select_ef_multi", [a, b], [torch.zeros_like(a), torch.zeros_like(b)], 0.05, 0.2)
    expect_error(caller, ValueError, r"gs\[2\]", "select_multi", [a, a, b.half()], 0.05, 0.2)
    # A residual list whose dtypes match gs but whose gs mix dtypes: still nothing written.
    c = torch.randn(5, dtype=torch.bfloat16)
    expect_error(caller, ValueError, r"gs\[1\]", "select_ef_multi", [a, c], [torch.ones_like(a), torch.ones_like(c)], 0.05, 0.2)


def test_overlapping_residual_is_rejected(caller):
    """A residual (or prune_'s g) whose elements share memory cannot be written in place:
    torch's internal-overlap error, and the shared storage is left alone."""
    g = torch.randn(10)
    base = torch.ones(1)
    with pytest.raises((RuntimeError, ValueError), match="memory location|overlap"):
        (_wrapper if caller == "wrapper" else _raw)("select_ef", g, base.expand(10), 0.05, 0.2)
    assert base.item() == 1.0
    with pytest.raises((RuntimeError, ValueError), match="memory location|overlap"):
        (_wrapper if caller == "wrapper" else _raw)("prune_", base.expand(10), 0.05, 0.2)
    assert base.item() == 1.0
