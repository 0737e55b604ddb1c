"""Band-selection ops: every ``torch.ops.dgp`` op against the reference.

What is checked, and how:

* every dispatch path in ``PATHS`` (the registered op on CPU tensors always; each forced
  C++ code path -- SIMD levels below the best, radix analysis with sampling off -- when the
  extension is built; CUDA when a GPU is present; add more there) is run on
  layout-preserving clones of the same inputs as
  :mod:`dgp_kernels.ops.reference`, and must agree **bit for bit**: indices with
  ``torch.equal``, values / residuals / dense outputs through their integer view (so
  ``-0.0`` vs ``+0.0`` and ``inf`` are checked exactly), dtypes, shapes, and the whole
  storage of every mutated argument (gaps of a sliced view must stay untouched);
* the reference itself is checked against a brute-force Python oracle (sort
  ``(-|x|, index)`` tuples) and the count formula of docs/semantics.md, so it is not trusted
  blindly;
* adversarial inputs, every dtype, hypothesis-generated cases, non-contiguous layouts,
  large tensors (300k and 3M elements) with heavy ties at both thresholds, multi-tensor
  lists, error-feedback conservation over 50 steps, 1 vs 2 threads, repeated calls.

Errors are in ``test_select_errors.py``; ``opcheck`` and ``torch.compile`` in
``test_select_compile.py``. The C++ CPU kernel is compared against the reference whenever
it is built (``dgp_kernels.backend_info().cpu == "cpp"``); before that the CPU key is served
by the reference itself and the comparisons are trivially true.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, List, Optional, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgp_kernels
from dgp_kernels.ops import reference as ref
from dgp_kernels.ops import band_counts

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = ("f32", "f64", "f16", "bf16")
_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
OP_NAMES = ("select", "select_ef", "prune", "prune_", "select_multi", "select_ef_multi")
REFERENCE = {name: getattr(ref, name) for name in OP_NAMES}

# (top, keep) pairs: defaults, the edges named by the issue, and fractions whose products
# need the 1e-6 of the count formula (0.7 * 10 = 7.000000000000001, 0.29 * 100 = 28.999...).
FRACTIONS = [
    (0.05, 0.20),
    (0.0, 0.0),
    (0.0, 0.2),
    (0.05, 0.0),
    (0.0, 1.0),
    (1.0, 0.0),
    (0.7, 0.3),
    (0.3, 0.7),
    (0.5, 0.5),
    (0.29, 0.57),
    (0.01, 0.02),
    (0.25, 0.5),
]
FRACTION_IDS = [f"t{t}-k{k}" for t, k in FRACTIONS]


# --------------------------------------------------------------------------------------
# Bitwise comparison helpers.
# --------------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    """The integer view of a float tensor (identity for integer tensors)."""
    view = _INT_VIEW.get(t.dtype)
    return t if view is None else t.view(view)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, shape, device and bit pattern (strides too where they are meaningful)."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    if actual.numel() > 1:
        assert actual.stride() == expected.stride(), (
            f"{what}: strides {actual.stride()} != {expected.stride()}"
        )
    a, b = bits(actual), bits(expected)
    if not torch.equal(a, b):
        diff = (a != b).reshape(-1).nonzero().reshape(-1)
        i = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.numel()} of {a.numel()} entries differ bitwise; first at flat "
            f"index {i}: {actual.reshape(-1)[i].item()!r} (bits {int(a.reshape(-1)[i])}) vs "
            f"expected {expected.reshape(-1)[i].item()!r} (bits {int(b.reshape(-1)[i])})"
        )


def assert_tree_same(actual: Any, expected: Any, what: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert_same(actual, expected, what)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{what}: got {type(actual).__name__}"
        assert len(actual) == len(expected), f"{what}: {len(actual)} items != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_same(a, e, f"{what}[{i}]")
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def _full_storage(t: torch.Tensor) -> torch.Tensor:
    """All elements of ``t``'s storage as a flat tensor (a sliced view's gaps included)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return t.as_strided((n,), (1,), 0)


def clone_keep_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same sizes, strides and storage offset, in a copy of the storage."""
    base = _full_storage(t).clone()
    return base.as_strided(t.size(), t.stride(), t.storage_offset())


def _clone_args(args: Sequence[Any]) -> List[Any]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(clone_keep_layout(a))
        elif isinstance(a, (list, tuple)):
            out.append([clone_keep_layout(t) for t in a])
        else:
            out.append(a)
    return out


def _tensors(args: Sequence[Any]) -> List[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(a)
    return out


# --------------------------------------------------------------------------------------
# Dispatch paths. A path runs ``torch.ops.dgp.<op>`` semantics (same arguments, same
# results, declared arguments mutated in place) through one backend or one forced code path
# of a backend. To add one (e.g. the Triton launchers under TRITON_INTERPRET=1), append a
# ``Path`` to PATHS. ``max_numel`` skips inputs too large for a slow path (the Triton
# interpreter: ~1e5); ``dtypes`` and ``min_numel`` say where a forced variant runs different
# code from the default path. A test declares the inputs it gives its path with
# ``@path_inputs(dtypes, max_n)``, and tests/ops/conftest.py leaves out at collection the
# (test, path) pairs where the forced path would only repeat "op".
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Path:
    name: str
    call: Callable[..., Any]
    max_numel: int = 1 << 62
    dtypes: tuple = DTYPES
    min_numel: int = 0

    def __call__(self, op: str, *args: Any) -> Any:
        return self.call(op, *args)

    def __repr__(self) -> str:
        return f"Path({self.name})"

    def skip_if_too_large(self, n: int) -> None:
        if n > self.max_numel:
            pytest.skip(f"path {self.name} is limited to {self.max_numel} elements")

    def runs_own_code(self, dtypes: Sequence[torch.dtype] = DTYPES, max_n: int = 1 << 62) -> bool:
        """Whether inputs of these dtypes / this largest size reach code of this path that the
        default path does not run (else a test on them would only repeat "op")."""
        return any(d in self.dtypes for d in dtypes) and max_n >= self.min_numel


def path_inputs(dtypes: Any = "dtype", max_n: Any = 1 << 62):
    """Declare the inputs a ``backend`` test gives its path: ``dtypes`` a tuple of dtypes or
    the name of the test's dtype parameter, ``max_n`` the largest input's size, an int or the
    name of a parameter. Pairs with a path that would run the default code on them, or with
    inputs too large for the path, are not collected (tests/ops/conftest.py)."""
    return pytest.mark.path_inputs(dtypes=dtypes, max_n=max_n)


def _call_op(op: str, *args: Any) -> Any:
    return getattr(torch.ops.dgp, op)(*args)


def _mutable_arg_positions(op: str) -> List[int]:
    schema = getattr(torch.ops.dgp, op).default._schema
    return [
        i
        for i, a in enumerate(schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    ]


def _to(x: Any, device: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(t, device) for t in x)
    return x


def device_path(device: str, max_numel: int = 1 << 62) -> Path:
    """Run the op on ``device`` copies; copy declared-mutable arguments back; outputs to CPU."""

    def call(op: str, *args: Any) -> Any:
        dev_args = [_to(a, device) for a in args]
        out = _call_op(op, *dev_args)
        for i in _mutable_arg_positions(op):
            src, dst = dev_args[i], args[i]
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
            else:
                for d, s in zip(dst, src):
                    d.copy_(s)
        return _to(out, "cpu")

    return Path(f"device-{device}", call, max_numel)


def _cpp_module():
    """``dgp_kernels._C`` when the C++ CPU kernel serves the CPU key, else None."""
    if dgp_kernels.backend_info().cpu != "cpp":
        return None
    from dgp_kernels import _C

    return _C


@contextlib.contextmanager
def cpp_mode(simd: Optional[str] = None, sampling: Optional[bool] = None):
    """Force a C++ compaction path (``_C.set_simd_level``) and/or the sampled-bracket
    analysis of large layers on or off (``_C.set_sampling``); restore the defaults after."""
    _C = _cpp_module()
    try:
        if simd is not None:
            _C.set_simd_level(simd)
        if sampling is not None:
            _C.set_sampling(sampling)
        yield
    finally:
        if simd is not None:
            _C.set_simd_level("best")
        if sampling is not None:
            _C.set_sampling(True)


def _cpp_modes() -> List[tuple]:
    """(name, kwargs for cpp_mode, dtypes, min_numel) of every forced C++ path that runs code
    the default path does not: each SIMD level below the best (the counting and write sweeps
    of every dtype), and the radix analysis with sampling off (layers of >= 2^15 entries,
    kSampleMin)."""
    _C = _cpp_module()
    modes = []
    if _C is None:
        return modes
    if hasattr(_C, "set_simd_level") and hasattr(_C, "simd_best"):
        levels = ["scalar", "avx2", "avx512"]
        best = levels.index(_C.simd_best())
        modes += [(f"cpp-{lvl}", dict(simd=lvl), DTYPES, 0) for lvl in levels[:best]]
    if hasattr(_C, "set_sampling"):
        modes.append(("cpp-radix", dict(sampling=False), DTYPES, 1 << 15))  # kSampleMin in csrc/cpu/select_core.h
    return modes


def _mode_path(name: str, kwargs: dict, dtypes: tuple, min_numel: int) -> Path:
    def call(op: str, *args: Any) -> Any:
        with cpp_mode(**kwargs):
            return _call_op(op, *args)

    return Path(name, call, dtypes=dtypes, min_numel=min_numel)


PATHS: List[Path] = [Path("op", _call_op)]
PATHS += [_mode_path(*m) for m in _cpp_modes()]
if torch.cuda.is_available():
    PATHS.append(device_path("cuda"))


@pytest.fixture(params=PATHS, ids=[p.name for p in PATHS])
def backend(request) -> Path:
    return request.param


def run_both(path: Path, op: str, *args: Any) -> Any:
    """Run ``op`` through ``path`` and through the reference on clones of ``args``.

    Asserts bitwise-identical outputs, bitwise-identical mutated arguments (whole storage),
    and that arguments not declared mutable are untouched. Returns the path's output.
    """
    path.skip_if_too_large(max([t.numel() for t in _tensors(args)], default=0))
    args_p, args_r = _clone_args(args), _clone_args(args)
    out_p = path(op, *args_p)
    out_r = REFERENCE[op](*args_r)
    if op == "prune_":  # the op returns nothing; the reference also returns None
        out_p = out_r = None
    assert_tree_same(out_p, out_r, f"{path.name} {op} output")
    mutable = set(_mutable_arg_positions(op))
    for i, (orig, a_p, a_r) in enumerate(zip(args, args_p, args_r)):
        if not isinstance(orig, (torch.Tensor, list, tuple)):
            continue
        origs = [orig] if isinstance(orig, torch.Tensor) else list(orig)
        a_ps = [a_p] if isinstance(orig, torch.Tensor) else list(a_p)
        a_rs = [a_r] if isinstance(orig, torch.Tensor) else list(a_r)
        for j, (o, p, r) in enumerate(zip(origs, a_ps, a_rs)):
            where = f"{path.name} {op} argument {i}" + ("" if isinstance(orig, torch.Tensor) else f"[{j}]")
            assert_same(_full_storage(p), _full_storage(r), where + " (storage)")
            if i not in mutable:
                assert_same(_full_storage(p), _full_storage(o), where + " modified")
    return out_p


# --------------------------------------------------------------------------------------
# Independent oracle: plain Python, no torch sorting.
# --------------------------------------------------------------------------------------
def counts_formula(n: int, top: float, keep: float):
    """The counts of docs/semantics.md written out again, independently of ``band_counts``."""
    k_top = math.floor(top * n + 1e-6)
    k_keep = min(math.floor(keep * n + 1e-6), n - k_top)
    return k_top, k_keep


def brute_band(values: Sequence[float], top: float, keep: float) -> List[int]:
    """Sorted flat indices of the band: rank by (-|x|, index), take [k_top, k_top + k_keep)."""
    n = len(values)
    k_top, k_keep = counts_formula(n, top, keep)
    order = sorted(range(n), key=lambda i: (-abs(values[i]), i))
    return sorted(order[k_top : k_top + k_keep])


def check_invariants(g: torch.Tensor, top: float, keep: float, idx: torch.Tensor, val: torch.Tensor) -> None:
    """Properties every correct answer has, whatever computed it."""
    n = g.numel()
    k_keep = counts_formula(n, top, keep)[1]
    assert idx.dtype == torch.int64 and idx.shape == (k_keep,), (idx.dtype, idx.shape, k_keep)
    assert val.dtype == g.dtype and val.shape == (k_keep,), (val.dtype, val.shape)
    if k_keep:
        assert int(idx[0]) >= 0 and int(idx[-1]) < n
        assert bool((idx[1:] > idx[:-1]).all()), "indices not strictly ascending"
        assert_same(val, g.reshape(-1)[idx], "values != g.flatten()[indices]")


# --------------------------------------------------------------------------------------
# Input generators. Each returns a flat tensor of n entries of the dtype (bit-exact,
# deterministic for a seed); callers reshape.
# --------------------------------------------------------------------------------------
def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def _smallest_subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps  # 2**(emin - mantissa bits)


def make_values(kind: str, n: int, dtype: torch.dtype, seed: int = 0, top: float = 0.05, keep: float = 0.2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    if kind == "randn":
        x = torch.randn(n, generator=gen, dtype=f64)
    elif kind == "wide":  # magnitudes spread over many binades
        x = torch.randn(n, generator=gen, dtype=f64) * torch.exp2(torch.randint(-20, 20, (n,), generator=gen).to(f64))
    elif kind == "equal":
        x = torch.full((n,), 1.5, dtype=f64)
    elif kind == "equal_signed":
        x = torch.full((n,), 1.5, dtype=f64) * _signs(n, gen)
    elif kind == "zeros90":  # 90% exact zeros of both signs
        x = torch.randn(n, generator=gen, dtype=f64)
        zero = torch.rand(n, generator=gen) < 0.9
        x[zero] = 0.0 * _signs(n, gen)[zero]
    elif kind == "signed_zeros":  # only ±0 and a few ±1
        x = 0.0 * _signs(n, gen)
        one = torch.rand(n, generator=gen) < 0.1
        x[one] = _signs(n, gen)[one]
    elif kind == "inf":  # ±inf mixed with finite values and zeros
        x = torch.randn(n, generator=gen, dtype=f64)
        r = torch.rand(n, generator=gen)
        x[r < 0.15] = math.inf * _signs(n, gen)[r < 0.15]
        x[(r > 0.5) & (r < 0.6)] = 0.0
    elif kind == "band_tie":  # one magnitude spans both thresholds, mixed signs
        k_top, k_keep = band_counts(n, top, keep)
        lo = max(0, k_top - 3 - n // 50)
        hi = min(n, k_top + k_keep + 3 + n // 50)
        mags = torch.empty(n, dtype=f64)
        mags[:lo] = 4.0 + torch.rand(lo, generator=gen, dtype=f64)
        mags[lo:hi] = 2.0
        mags[hi:] = torch.rand(n - hi, generator=gen, dtype=f64)
        x = (mags * _signs(n, gen))[torch.randperm(n, generator=gen)]
    elif kind == "narrow":  # one binade, close values: a constant exponent, huge radix buckets
        x = (1.0 + torch.rand(n, generator=gen, dtype=f64) * 2.0**-10) * _signs(n, gen)
    elif kind == "few_distinct":  # huge layers of ties
        pool = torch.tensor([0.0, 0.25, 1.0, 3.0], dtype=f64)
        x = pool[torch.randint(0, 4, (n,), generator=gen)] * _signs(n, gen)
    elif kind == "subnormal":  # subnormals, the smallest normal, zeros and some normals
        tiny, sub = torch.finfo(dtype).tiny, _smallest_subnormal(dtype)
        x = torch.randint(-40, 41, (n,), generator=gen).to(f64) * sub
        r = torch.rand(n, generator=gen)
        x[r < 0.1] = tiny * _signs(n, gen)[r < 0.1]
        x[r > 0.9] = torch.randn(n, generator=gen, dtype=f64)[r > 0.9]
        if dtype != torch.float64:
            return x.to(dtype)
        # int * 2**-1074 is exact in float64 (it is how subnormals are spelled).
        return x
    elif kind == "bits":  # uniformly random bit patterns, NaNs replaced by ±inf
        view = _INT_VIEW[dtype]
        info = torch.iinfo(view)
        raw = torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(view)
        y = raw.view(dtype).clone()
        y[torch.isnan(y)] = math.inf
        return y
    else:
        raise AssertionError(kind)
    return x.to(dtype)


KINDS = ("randn", "wide", "equal", "equal_signed", "zeros90", "signed_zeros", "inf",
         "band_tie", "few_distinct", "subnormal", "bits", "narrow")


def check_all_ops(path: Path, g: torch.Tensor, top: float, keep: float,
                  residual: Optional[torch.Tensor] = None, ops=("select", "prune", "prune_", "select_ef")) -> None:
    """Every single-tensor op on ``g`` through ``path`` vs the reference, plus invariants."""
    out = None
    if "select" in ops:
        idx, val = run_both(path, "select", g, top, keep)
        check_invariants(g, top, keep, idx, val)
        out = (idx, val)
    if "prune" in ops:
        dense = run_both(path, "prune", g, top, keep)
        assert dense.is_contiguous() and dense.shape == g.shape
        if out is not None:
            expect = torch.zeros(g.shape, dtype=g.dtype)
            expect.view(-1)[out[0]] = out[1]
            assert_same(dense, expect, "prune == dense(select)")
    if "prune_" in ops:
        run_both(path, "prune_", g, top, keep)
    if "select_ef" in ops:
        if residual is None:
            residual = torch.zeros_like(g)
        idx, val = run_both(path, "select_ef", g, residual, top, keep)
        v = (g.reshape(-1) + residual.reshape(-1))
        check_invariants(v, top, keep, idx, val)


# --------------------------------------------------------------------------------------
# Counts.
# --------------------------------------------------------------------------------------
def test_counts_defaults_are_the_authors_formula():
    rng = random.Random(1)
    ns = list(range(0, 5000)) + [rng.randrange(1, 10**10) for _ in range(5000)]
    ns += [11_173_962, 25_000_000, 2**31 - 1, 2**31, 2**32 + 7, 10**12 + 19]
    for n in ns:
        assert band_counts(n, 0.05, 0.20) == (n // 20, (2 * n // 5) // 2), n


def test_counts_examples():
    assert band_counts(10, 0.7, 0.3) == (7, 3)
    assert band_counts(10, 0.3, 0.7) == (3, 7)
    assert band_counts(10, 0.0, 0.3) == (0, 3)
    assert band_counts(100, 0.29, 0.71) == (29, 71)
    assert band_counts(100, 0.07, 0.57) == (7, 57)
    assert band_counts(20, 0.05, 0.2) == (1, 4)
    assert band_counts(19, 0.05, 0.2) == (0, 3)
    assert band_counts(0, 0.05, 0.2) == (0, 0)
    assert band_counts(1, 0.05, 0.2) == (0, 0)
    assert band_counts(1, 0.0, 1.0) == (0, 1)
    assert band_counts(1, 1.0, 0.0) == (1, 0)
    assert band_counts(3, 0.5, 0.5) == (1, 1)
    assert band_counts(5, 1 / 3, 2 / 3) == (1, 3)
    # k_keep is clamped to what is left above... below the top: never more than n - k_top.
    assert band_counts(10, 1.0, 1.0) == (10, 0)
    assert band_counts(10, 0.5, 0.6) == (5, 5)


def test_counts_match_exact_decimal_arithmetic():
    """For fractions written with <= 3 decimals and n <= 1e6, the 1e-6 makes the double
    formula equal to exact decimal arithmetic (an inexact product is >= 1e-3 from an integer)."""
    rng = random.Random(2)
    for _ in range(20000):
        top_m = rng.randrange(0, 1001)
        keep_m = rng.randrange(0, 1001 - top_m)
        n = rng.choice([rng.randrange(0, 100), rng.randrange(0, 10**6)])
        top, keep = top_m / 1000, keep_m / 1000
        k_top = math.floor(Fraction(top_m, 1000) * n)
        k_keep = min(math.floor(Fraction(keep_m, 1000) * n), n - k_top)
        assert band_counts(n, top, keep) == (k_top, k_keep), (n, top, keep)
        assert counts_formula(n, top, keep) == (k_top, k_keep)


@pytest.mark.parametrize("top,keep", FRACTIONS + [(0.07, 0.57), (1 / 3, 2 / 3), (0.001, 0.999)])
@path_inputs((torch.float32,), 1001)
def test_output_sizes_follow_counts(backend, top, keep):
    for n in list(range(0, 67)) + [99, 100, 101, 999, 1000, 1001]:
        g = make_values("randn", n, torch.float32, seed=n)
        idx, val = backend("select", g, top, keep)
        k = band_counts(n, top, keep)[1]
        assert idx.shape == (k,) and val.shape == (k,), (n, top, keep, idx.shape)
        idx2, _, off = backend("select_multi", [g, g[: n // 2]], top, keep)
        k2 = band_counts(n // 2, top, keep)[1]
        assert off.tolist() == [0, k, k + k2]


# --------------------------------------------------------------------------------------
# The reference against the brute-force oracle.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_bruteforce(dtype, kind):
    for n, (top, keep) in [(0, (0.05, 0.2)), (1, (0.0, 1.0)), (2, (0.5, 0.5)), (7, (0.3, 0.7)),
                           (20, (0.05, 0.2)), (31, (0.1, 0.5)), (40, (0.7, 0.3)),
                           (100, (0.05, 0.2)), (257, (0.29, 0.57)), (600, (0.0, 0.2))]:
        g = make_values(kind, n, dtype, seed=n, top=top, keep=keep)
        idx, val = ref.select(g, top, keep)
        assert idx.tolist() == brute_band(g.tolist(), top, keep), (kind, n, top, keep)
        check_invariants(g, top, keep, idx, val)
        # Error feedback: v = g + e in g's dtype, band of v, residual = v with kept zeroed.
        e = make_values("randn", n, dtype, seed=n + 1000)
        v = g + e
        e_ref = e.clone()
        idx_ef, val_ef = ref.select_ef(g, e_ref, top, keep)
        assert idx_ef.tolist() == brute_band(v.tolist(), top, keep)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[idx_ef] = True
        assert_same(val_ef, v[idx_ef], "reference select_ef values")
        assert bool((bits(e_ref)[kept] == 0).all()), "kept residual entries must be +0.0"
        assert_same(e_ref[~kept], v[~kept], "reference residual outside the band")


_POOL = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0, -3.0, 1e-3, 1e30, -1e30,
         math.inf, -math.inf, 1e-40, -1e-45, 6e-8, 2.0**-126, 65504.0, 1.0000001]


@st.composite
def band_cases(draw, max_n: int = 80):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, max_n))
    pool = draw(st.lists(st.sampled_from(_POOL), min_size=1, max_size=6, unique=True))
    vals = draw(st.lists(st.one_of(st.sampled_from(pool), st.floats(-1e4, 1e4, allow_nan=False)),
                         min_size=n, max_size=n))
    top = draw(st.one_of(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]), st.floats(0.0, 1.0)))
    keep = draw(st.one_of(st.sampled_from([0.0, 0.2, 0.3, 1.0 - top]), st.floats(0.0, 1.0 - top)))
    keep = min(keep, 1.0 - top) if top + keep > 1.0 + 1e-9 else keep
    return torch.tensor(vals, dtype=torch.float64).to(dtype), top, keep


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(band_cases())
def test_reference_matches_bruteforce_hypothesis(case):
    g, top, keep = case
    idx, val = ref.select(g, top, keep)
    assert idx.tolist() == brute_band(g.tolist(), top, keep)
    check_invariants(g, top, keep, idx, val)


# --------------------------------------------------------------------------------------
# Ops against the reference.
# --------------------------------------------------------------------------------------
SHAPES = [(), (0,), (1,), (2,), (7,), (31,), (32,), (33,), (100,), (3, 0, 2), (64, 64),
          (5, 7, 11), (1000,), (4099,), (2, 3, 4, 5), (1, 1, 1), (8191,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("top,keep", [(0.05, 0.2), (0.0, 1.0), (0.3, 0.7), (0.01, 0.5)])
@path_inputs("dtype", 8191)
def test_random_shapes(backend, dtype, top, keep):
    for i, shape in enumerate(SHAPES):
        n = math.prod(shape)
        g = make_values("wide", n, dtype, seed=i).reshape(shape)
        e = make_values("randn", n, dtype, seed=i + 100).reshape(shape)
        check_all_ops(backend, g, top, keep, residual=e)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top,keep", FRACTIONS, ids=FRACTION_IDS)
@path_inputs("dtype", 4097)
def test_adversarial(backend, dtype, kind, top, keep):
    # Sizes around the SIMD vector widths and the direct path's small-n cut-offs.
    for n in (1, 5, 31, 64, 1000, 4097):
        g = make_values(kind, n, dtype, seed=n, top=top, keep=keep)
        # A residual that is zero (v = g + 0 turns -0.0 into +0.0) or of the same kind.
        e = torch.zeros_like(g) if n % 2 else make_values(kind, n, dtype, seed=n + 7, top=top, keep=keep)
        e[torch.isnan(g + e)] = 0.0  # inf - inf is an error case, tested elsewhere
        check_all_ops(backend, g, top, keep, residual=e)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top,keep", [(0.05, 0.2), (0.7, 0.3), (0.0, 1.0)], ids=["default", "t0.7-k0.3", "all"])
@pytest.mark.parametrize("n", [20_000, 40_000])
@path_inputs("dtype", "n")
def test_adversarial_medium(backend, dtype, kind, top, keep, n):
    """Either side of the direct path's limit (2^15, kDirectMax): the direct path at 20,000;
    at 40,000 the sampled path with its radix fallback (and, forced, the radix path)."""
    g = make_values(kind, n, dtype, seed=n, top=top, keep=keep).reshape(100, -1)
    e = make_values(kind, n, dtype, seed=n + 7, top=top, keep=keep).reshape(100, -1)
    e[torch.isnan(g + e)] = 0.0
    check_all_ops(backend, g, top, keep, residual=e, ops=("select", "select_ef"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@path_inputs("dtype", 10)
def test_inf_plus_finite_residual_and_overflow(backend, dtype):
    """g + residual may overflow to ±inf; it ranks highest and is kept/dropped by rank."""
    big = torch.finfo(dtype).max
    g = torch.tensor([big, -big, 1.0, math.inf, -2.0, 0.0, -0.0, 3.0, big, 0.5], dtype=dtype)
    e = torch.tensor([big, -big, -1.0, 5.0, -math.inf, -0.0, -0.0, -3.0, -big, 0.0], dtype=dtype)
    for top, keep in [(0.0, 0.5), (0.1, 0.3), (0.3, 0.7), (0.0, 1.0), (0.5, 0.5)]:
        run_both(backend, "select_ef", g, e, top, keep)
        check_all_ops(backend, g + e, top, keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@path_inputs("dtype", 4200)
def test_non_contiguous_layouts(backend, dtype):
    big = make_values("few_distinct", 60 * 70, dtype, seed=3).reshape(60, 70)
    res_big = make_values("randn", 60 * 70, dtype, seed=4).reshape(60, 70)
    views = {
        "transposed": (big.t(), res_big.t()),
        "slice_step": (big[1::3, ::2], res_big[2::3, 1::2]),
        "column": (big[:, 5], res_big[:, 6]),
        "transposed_slice": (big.t()[3:50, ::4], res_big.t()[10:57, 2::4]),
        "narrow_offset": (big.reshape(-1)[17:1017], res_big.reshape(-1)[100:1100]),
        "channels_last": (big.reshape(6, 10, 7, 10).contiguous(memory_format=torch.channels_last),
                          res_big.reshape(6, 10, 7, 10).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)),
        "contig_g_strided_res": (big[:30].contiguous(), res_big[::2]),
    }
    for name, (g, e) in views.items():
        assert g.shape == e.shape, name
        for top, keep in [(0.05, 0.2), (0.3, 0.4), (0.0, 1.0)]:
            check_all_ops(backend, g, top, keep, residual=e)
    # Broadcast (stride-0) inputs are fine where g is read only.
    g = make_values("randn", 50, dtype, seed=5).reshape(50, 1).expand(50, 40)
    for op in ("select", "prune"):
        run_both(backend, op, g, 0.05, 0.2)
    run_both(backend, "select_ef", g, make_values("randn", 2000, dtype).reshape(50, 40), 0.05, 0.2)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2), (), (1,)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@path_inputs("dtype", 1)
def test_empty_and_single(backend, shape, dtype):
    n = math.prod(shape)
    g = make_values("randn", n, dtype, seed=1).reshape(shape)
    e = make_values("randn", n, dtype, seed=2).reshape(shape)
    for top, keep in FRACTIONS:
        check_all_ops(backend, g, top, keep, residual=e)
        run_both(backend, "select_multi", [g, g], top, keep)
        run_both(backend, "select_ef_multi", [g, g], [e, e.clone()], top, keep)


# Large tensors: enough that a parallel / radix kernel takes its multi-block, multi-thread
# and candidate-refinement paths, with heavy ties exactly at the thresholds.
LARGE_CASES = [
    ("band_tie", 300_000, torch.float32, (0.05, 0.2), ("select", "select_ef")),
    ("band_tie", 300_001, torch.float64, (0.1, 0.3), ("select_ef",)),
    ("randn", 300_000, torch.bfloat16, (0.05, 0.2), ("select", "select_ef")),  # 2^15 keys
    ("band_tie", 299_999, torch.float16, (0.05, 0.2), ("select_ef",)),
    ("zeros90", 300_000, torch.float16, (0.05, 0.2), ("select", "prune_")),
    ("few_distinct", 300_000, torch.float64, (0.05, 0.2), ("select",)),
    ("subnormal", 300_000, torch.float32, (0.02, 0.9), ("select",)),
    ("bits", 300_000, torch.float32, (0.05, 0.2), ("select",)),
    ("narrow", 300_000, torch.float32, (0.05, 0.2), ("select_ef",)),
    ("narrow", 200_000, torch.float64, (0.3, 0.3), ("select",)),
    ("band_tie", 3_000_000, torch.float32, (0.05, 0.2), ("select_ef",)),
    ("zeros90", 3_000_000, torch.float32, (0.05, 0.2), ("select",)),
]


@pytest.mark.parametrize("kind,n,dtype,fr,ops", LARGE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}".replace("torch.", "") for c in LARGE_CASES])
@path_inputs("dtype", "n")
def test_large(backend, kind, n, dtype, fr, ops):
    top, keep = fr
    g = make_values(kind, n, dtype, seed=n, top=top, keep=keep)
    if n > 1_000_000:
        g = g.reshape(1000, -1)
    e = make_values("band_tie", n, dtype, seed=n + 1, top=top, keep=keep).reshape(g.shape) * 0.5
    check_all_ops(backend, g, top, keep, residual=e, ops=ops)


@path_inputs((torch.float32,), 300_000)
def test_large_unaligned_views(backend):
    """Contiguous views at odd element offsets: SIMD loads/stores that are not vector aligned,
    g and residual misaligned differently."""
    n = 300_000
    g = make_values("band_tie", n + 16, torch.float32, seed=3)[3 : 3 + n]
    e = make_values("randn", n + 16, torch.float32, seed=4)[13 : 13 + n]
    check_all_ops(backend, g, 0.05, 0.2, residual=e, ops=("select", "select_ef", "prune_"))


def test_inputs_reach_every_cpp_analysis_path():
    """The inputs above are meant to drive each analysis path of the C++ kernel; check that
    they still do (``_C.path_counts``), so a changed heuristic cannot silently leave a path
    untested. Paths: the direct radix descent on small layers, radix histograms (sampling
    off), sampled brackets, and the sampled path's fallback (a bracket that misses its
    rank, e.g. 90% exact zeros)."""
    _C = _cpp_module()
    if _C is None or not hasattr(_C, "path_counts"):
        pytest.skip("needs the C++ kernel with path counters")
    inputs = {
        "direct": make_values("band_tie", 20_000, torch.float32),
        "radix": make_values("band_tie", 40_000, torch.float32),
        "sampled": make_values("band_tie", 300_000, torch.float32),
        "sampled_fallback": make_values("zeros90", 300_000, torch.float16, seed=300_000),
    }
    _C.path_counts(True)
    try:
        for path, g in inputs.items():
            with cpp_mode(sampling=path != "radix"):
                torch.ops.dgp.select(g, 0.05, 0.2)
            counts = _C.path_counts(True)
            assert counts.get(path, 0) >= 1, f"{path} input took {counts}"
        with cpp_mode(sampling=False):
            torch.ops.dgp.select(inputs["sampled"], 0.05, 0.2)
        counts = _C.path_counts(True)
        assert counts.get("radix", 0) >= 1 and counts.get("sampled", 0) == 0, counts
    finally:
        _C.path_counts(True)


def _slot_overflow_input(kind: str, n: int = 300_017) -> torch.Tensor:
    """float32 layers for the sampled path's candidate slots: ``tie90`` (90% of the entries
    one value, both boundaries inside it: the slot overflows), ``toptie`` (the upper boundary
    inside a tie group of 12.5%: its slot overflows), ``randn`` (the slots fill normally)."""
    gen = torch.Generator().manual_seed(5)
    if kind == "randn":
        return torch.randn(n, generator=gen)
    if kind == "tie90":
        x = torch.full((n,), 1.0)
        k = n // 20
        x[:k] = 2.0 + torch.rand(k, generator=gen)
        x[-k:] = -torch.rand(k, generator=gen) * 0.5
    else:
        x = torch.randn(n, generator=gen) * 0.1
        k = n // 50
        x[:k] = 5.0 + torch.rand(k, generator=gen)
        x[k:k + n // 8] = -1.0
    return x[torch.randperm(n, generator=gen)]


@pytest.mark.parametrize("simd", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("kind", ["tie90", "toptie", "randn"])
def test_float32_count_sweeps_overflow_and_fill_their_slots(simd, kind):
    """The float32 counting sweeps (scalar, AVX2, AVX-512; the SIMD ones append branch-free,
    always storing a whole vector into the slot's slack) on layers whose candidate slots
    overflow (the sampled path falls back) and on one where they fill normally: bit-exact
    with the reference, error feedback included, and that path taken."""
    _C = _cpp_module()
    if _C is None or not hasattr(_C, "set_simd_level"):
        pytest.skip("needs the C++ kernel")
    levels = ["scalar", "avx2", "avx512"]
    if levels.index(simd) > levels.index(_C.simd_best()):
        pytest.skip(f"this CPU has no {simd}")
    g = _slot_overflow_input(kind)
    e = torch.zeros_like(g)  # (mostly zero, so that the tie groups survive g + e)
    e[::997] = 0.25
    e_ref = e.clone()
    want = ref.select_ef(g, e_ref, 0.05, 0.2)
    _C.path_counts(True)
    with cpp_mode(simd=simd):
        got = torch.ops.dgp.select_ef(g, e, 0.05, 0.2)
    counts = _C.path_counts(True)
    assert_tree_same(got, want, f"select_ef {kind} {simd}")
    assert_tree_same(e, e_ref, "residual")
    path = "sampled" if kind == "randn" else "sampled_fallback"
    assert counts.get(path, 0) == 1, counts


@pytest.mark.parametrize("ef", [False, True])
def test_float32_prefetching_sweeps_are_exact(ef):
    """With software prefetch on (``_C.set_prefetch``), the float32 AVX-512 counting and
    write sweeps run their prefetching instantiation: bit-exact with the reference, error
    feedback included, on the sampled path and on a layer split into chunks."""
    _C = _cpp_module()
    if _C is None or not hasattr(_C, "set_prefetch"):
        pytest.skip("needs the C++ kernel")
    if _C.simd_best() != "avx512":
        pytest.skip("this CPU has no avx512")
    gen = torch.Generator().manual_seed(11)
    gs = [torch.randn(n, generator=gen) for n in (70001, 1 << 18)]
    gs.append(_slot_overflow_input("toptie"))
    res = [torch.randn(g.shape, generator=gen) * 0.1 for g in gs]
    res_ref = [r.clone() for r in res]
    want = ref.select_ef_multi(gs, res_ref, 0.05, 0.2) if ef else ref.select_multi(gs, 0.05, 0.2)
    old = _C.set_prefetch(8)
    try:
        with cpp_mode(simd="avx512"):
            _C.path_counts(True)
            if ef:
                got = torch.ops.dgp.select_ef_multi(gs, res, 0.05, 0.2)
            else:
                got = torch.ops.dgp.select_multi(gs, 0.05, 0.2)
            counts = _C.path_counts(True)
    finally:
        _C.set_prefetch(old)
    assert_tree_same(got, want, f"prefetch ef={ef}")
    assert_tree_same(res, res_ref, "residuals")
    assert counts.get("sampled", 0) + counts.get("sampled_fallback", 0) == 3, counts


# --------------------------------------------------------------------------------------
# Hypothesis: generated cases through the op path.
# --------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=band_cases(max_n=200), shape_seed=st.integers(0, 3), data=st.data())
@path_inputs(DTYPES, 200)
def test_hypothesis_ops_match_reference(backend, case, shape_seed, data):
    g, top, keep = case
    if g.dtype not in backend.dtypes:  # a forced path that runs the default code here
        return
    n = g.numel()
    # Fold n into a 2-D shape when it factors; optionally transpose (non-contiguous).
    if shape_seed and n > 1:
        rows = next((d for d in (7, 5, 3, 2) if n % d == 0), 1)
        g = g.reshape(rows, -1)
        if shape_seed == 2:
            g = g.t()
    e_vals = data.draw(st.lists(st.sampled_from(_POOL[:12]), min_size=n, max_size=n))
    e = torch.tensor(e_vals, dtype=torch.float64).to(g.dtype).reshape(g.shape)
    if not torch.isnan(g + e).any():
        check_all_ops(backend, g, top, keep, residual=e)
    else:
        check_all_ops(backend, g, top, keep, ops=("select", "prune", "prune_"))
    run_both(backend, "select_multi", [g, g.reshape(-1)[: n // 2]], top, keep)


# --------------------------------------------------------------------------------------
# Multi-tensor ops.
# --------------------------------------------------------------------------------------
def _model_like(dtype: torch.dtype, seed: int = 0) -> List[torch.Tensor]:
    shapes = [(16, 3, 3, 3), (16,), (0,), (32, 16, 3, 3), (1,), (), (10, 512), (10,), (3, 0), (257,)]
    kinds = ["randn", "zeros90", "randn", "band_tie", "randn", "randn", "few_distinct", "inf", "randn", "equal_signed"]
    return [make_values(k, math.prod(s), dtype, seed=seed + i).reshape(s) for i, (s, k) in enumerate(zip(shapes, kinds))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("top,keep", [(0.05, 0.2), (0.0, 1.0), (0.3, 0.7), (0.1, 0.0)])
@path_inputs("dtype", 5120)
def test_multi_matches_single(backend, dtype, top, keep):
    gs = _model_like(dtype)
    # Make one layer non-contiguous.
    gs[6] = make_values("wide", 512 * 10, dtype, seed=9).reshape(512, 10).t()
    idx, val, off = run_both(backend, "select_multi", gs, top, keep)
    assert off.dtype == torch.int64 and off.shape == (len(gs) + 1,)
    assert off[0] == 0 and off[-1] == idx.numel() == val.numel()
    parts = dgp_kernels.split_multi(idx, val, off)
    for i, (g, (ii, vv)) in enumerate(zip(gs, parts)):
        assert off[i + 1] - off[i] == band_counts(g.numel(), top, keep)[1]
        si, sv = backend("select", g, top, keep)
        assert_same(ii, si, f"layer {i} indices")
        assert_same(vv, sv, f"layer {i} values")
    # Error feedback: per-layer residuals, compared with the single-tensor op.
    es = [make_values("randn", g.numel(), dtype, seed=50 + i).reshape(g.shape) for i, g in enumerate(gs)]
    es[3] = make_values("randn", 2 * es[3].numel(), dtype, seed=3).reshape(64, 16, 3, 3)[::2]  # strided
    es_multi = [clone_keep_layout(e) for e in es]
    idx, val, off = run_both(backend, "select_ef_multi", gs, es, top, keep)
    assert_tree_same(backend("select_ef_multi", gs, es_multi, top, keep), (idx, val, off), "ef_multi")
    for i, (g, e, em, (ii, vv)) in enumerate(zip(gs, es, es_multi, dgp_kernels.split_multi(idx, val, off))):
        e1 = clone_keep_layout(e)
        si, sv = backend("select_ef", g, e1, top, keep)
        assert_same(ii, si, f"layer {i} ef indices")
        assert_same(vv, sv, f"layer {i} ef values")
        assert_same(em, e1, f"layer {i} residual")


@path_inputs(DTYPES, 0)
def test_multi_empty_list(backend):
    idx, val, off = backend("select_multi", [], 0.05, 0.2)
    assert idx.shape == (0,) and idx.dtype == torch.int64
    assert val.shape == (0,) and val.is_floating_point()
    assert off.tolist() == [0] and off.dtype == torch.int64
    idx, val, off = backend("select_ef_multi", [], [], 0.05, 0.2)
    assert idx.shape == (0,) and val.shape == (0,) and off.tolist() == [0]
    assert dgp_kernels.select_multi([])[2].tolist() == [0]
    assert dgp_kernels.select_ef_multi([], [])[2].tolist() == [0]


@path_inputs((torch.float32,), 5)
def test_multi_all_empty_and_single(backend):
    for gs in ([torch.empty(0)], [torch.empty(0), torch.empty(3, 0)], [torch.tensor(2.0)], [torch.ones(1)] * 5):
        for top, keep in [(0.05, 0.2), (0.0, 1.0)]:
            run_both(backend, "select_multi", gs, top, keep)
            run_both(backend, "select_ef_multi", gs, [torch.zeros_like(g) for g in gs], top, keep)


@path_inputs((torch.float32,), 300_000)
def test_multi_many_layers(backend):
    """Many small layers and one large one (a kernel that parallelises across layers)."""
    gs = [make_values("band_tie", n, torch.float32, seed=n) for n in range(0, 300)]
    # One layer above kParMin (2^18: split into per-thread chunks) and the sampling size.
    gs.insert(150, make_values("band_tie", 300_000, torch.float32, seed=1))
    es = [make_values("randn", g.numel(), torch.float32, seed=7 + i) for i, g in enumerate(gs)]
    run_both(backend, "select_multi", gs, 0.05, 0.2)
    run_both(backend, "select_ef_multi", gs, es, 0.05, 0.2)


# --------------------------------------------------------------------------------------
# Error feedback conservation.
# --------------------------------------------------------------------------------------
def _check_conservation(g, e_old, e_new, idx, val):
    """dense(kept) + e_new == g + e_old; kept positions of e_new are +0.0; others hold v."""
    v = (g + e_old).reshape(-1)
    flat_new = e_new.reshape(-1)
    dense = torch.zeros_like(v)
    dense[idx] = val
    assert torch.equal(dense + flat_new, v), "dense(kept) + residual_new != g + residual_old"
    kept = torch.zeros(v.numel(), dtype=torch.bool)
    kept[idx] = True
    assert bool((bits(flat_new)[kept] == 0).all()), "kept positions of the residual must be +0.0"
    assert_same(flat_new[~kept], v[~kept], "residual outside the band must hold g + residual")
    assert_same(val, v[idx], "sent values must be g + residual at the kept positions")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@path_inputs("dtype", 1200)
def test_error_feedback_conservation(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (7,), (0,), (300,), (16, 3, 3)]
    residuals = [torch.zeros(s, dtype=dtype) for s in shapes]
    multi_res = [torch.zeros(s, dtype=dtype) for s in shapes]
    for step in range(50):
        gs = [(torch.randn(s, generator=gen, dtype=torch.float64) * 2.0 ** (step % 7 - 3)).to(dtype) for s in shapes]
        if step % 10 == 3:  # exact zeros and negative zeros in the gradient
            gs[0][::3] = -0.0
        for i, g in enumerate(gs):
            e_old = residuals[i].clone()
            idx, val = backend("select_ef", g, residuals[i], 0.05, 0.2)
            _check_conservation(g, e_old, residuals[i], idx, val)
        old = [e.clone() for e in multi_res]
        idx, val, off = backend("select_ef_multi", gs, multi_res, 0.05, 0.2)
        for i, (ii, vv) in enumerate(dgp_kernels.split_multi(idx, val, off)):
            _check_conservation(gs[i], old[i], multi_res[i], ii, vv)
            assert_same(multi_res[i], residuals[i], f"step {step}: multi vs single residual {i}")
    # The residual genuinely carries mass (the test is not vacuous).
    assert residuals[0].abs().sum() > 0


# --------------------------------------------------------------------------------------
# Determinism: threads and repeated calls.
# --------------------------------------------------------------------------------------
@path_inputs(DTYPES, 400_000)
def test_same_output_for_1_and_2_threads_and_repeats(backend):
    big = make_values("band_tie", 400_000, torch.float32, seed=11)
    bf = make_values("randn", 200_000, torch.bfloat16, seed=12)
    gs = [big.reshape(400, 1000), bf, make_values("zeros90", 5000, torch.float32, seed=13)]
    es = [make_values("band_tie", g.numel(), g.dtype, seed=20 + i).reshape(g.shape) for i, g in enumerate(gs)]

    def run_all():
        out = []
        for g, e in zip(gs, es):
            out.append(backend("select", g, 0.05, 0.2))
            e1 = e.clone()
            out.append((backend("select_ef", g, e1, 0.05, 0.2), e1))
            out.append(backend("prune", g, 0.1, 0.5))
        f32 = [gs[0], gs[2]]
        e_multi = [es[0].clone(), es[2].clone()]
        out.append((backend("select_ef_multi", f32, e_multi, 0.05, 0.2), e_multi))
        return out

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all()
        one_again = run_all()
        torch.set_num_threads(2)
        two = run_all()
    finally:
        torch.set_num_threads(saved)
    assert_tree_same(one_again, one, "repeat, 1 thread")
    assert_tree_same(two, one, "2 threads vs 1 thread")


# --------------------------------------------------------------------------------------
# Wrappers.
# --------------------------------------------------------------------------------------
def test_wrappers_match_ops_and_defaults():
    g = make_values("band_tie", 1000, torch.float32, seed=5).reshape(10, 100)
    e = make_values("randn", 1000, torch.float32, seed=6).reshape(10, 100)
    assert_tree_same(dgp_kernels.select(g), torch.ops.dgp.select(g, 0.05, 0.2), "select defaults")
    assert_tree_same(dgp_kernels.select(g, keep=0.3, top=0.1), torch.ops.dgp.select(g, 0.1, 0.3), "select kw")
    assert_tree_same(dgp_kernels.prune(g), torch.ops.dgp.prune(g, 0.05, 0.2), "prune defaults")
    e1, e2 = e.clone(), e.clone()
    assert_tree_same(dgp_kernels.select_ef(g, e1), torch.ops.dgp.select_ef(g, e2, 0.05, 0.2), "select_ef")
    assert_same(e1, e2, "select_ef residual")
    g1, g2 = g.clone(), g.clone()
    out = dgp_kernels.prune_(g1)
    assert out is g1, "prune_ returns its argument"
    torch.ops.dgp.prune_(g2, 0.05, 0.2)
    assert_same(g1, g2, "prune_")
    gs = [g, e[0], torch.empty(0)]
    assert_tree_same(dgp_kernels.select_multi(gs), torch.ops.dgp.select_multi(gs, 0.05, 0.2), "select_multi")
    assert_tree_same(dgp_kernels.select_multi(tuple(gs)), torch.ops.dgp.select_multi(gs, 0.05, 0.2), "tuple")
    r1 = [torch.zeros_like(x) for x in gs]
    r2 = [torch.zeros_like(x) for x in gs]
    assert_tree_same(dgp_kernels.select_ef_multi(gs, r1), torch.ops.dgp.select_ef_multi(gs, r2, 0.05, 0.2), "ef_multi")
    assert_tree_same(r1, r2, "ef_multi residuals")
    # Integer fractions 0 and 1 are accepted by the wrappers.
    assert_tree_same(dgp_kernels.select(g, 0, 1), torch.ops.dgp.select(g, 0.0, 1.0), "int fractions")


def test_wrapper_does_not_modify_g():
    g = make_values("signed_zeros", 500, torch.float16, seed=1)
    snapshot = g.clone()
    dgp_kernels.select(g)
    dgp_kernels.prune(g)
    dgp_kernels.select_ef(g, torch.zeros_like(g))
    dgp_kernels.select_multi([g])
    assert_same(g, snapshot, "g after the functional wrappers")


# --------------------------------------------------------------------------------------
# CI guard: the C++ extension must have been built there.
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("CI"), reason="only in CI, where the extension must be built")
def test_ci_uses_the_cpp_kernel():
    info = dgp_kernels.backend_info()
    assert info.cpu == "cpp", f"CPU ops are served by {info.cpu!r}: {info.reason}"


_FORK_SCRIPT = r"""
import os, sys, torch, dgp_kernels
from dgp_kernels.ops import reference as ref
# torch's own ops stay on one thread, so libgomp never starts its pool in this process:
# libgomp is not fork-safe, and a child's first parallel region would hang on the parent's
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(11)
g = torch.randn(600_000, generator=gen)
g[::7] = 0.5  # ties across the boundaries
e = torch.randn(600_000, generator=gen)
e_ref = e.clone()
idx, val = ref.select_ef(g, e_ref, 0.05, 0.2)
torch.set_num_threads(2)
torch.ops.dgp.select(g, 0.05, 0.2)  # starts the parent's pool workers
pid = os.fork()
if pid == 0:
    got = torch.ops.dgp.select_ef(g, e, 0.05, 0.2)  # 2 threads: the child's fresh pool
    torch.set_num_threads(1)
    ok = (torch.equal(got[0], idx) and torch.equal(got[1].view(torch.int32), val.view(torch.int32))
          and torch.equal(e.view(torch.int32), e_ref.view(torch.int32)))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_thread_pool_after_fork():
    """The C++ kernel's thread pool, used at 2 threads in the parent, works in a forked child
    (which gets a fresh pool: the parent's worker threads do not exist there). In a fresh
    process, so that no earlier test has started libgomp's threads in the parent."""
    import multiprocessing as mp
    import subprocess
    import sys

    if _cpp_module() is None or "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the C++ kernel and fork()")
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (
        f"the forked child failed (rc {proc.returncode}: 3 = wrong bits, negative = killed): "
        f"{proc.stderr[-2000:]}")
