"""Triton band selection vs the reference (and the C++ CPU kernel), bit for bit.

Without a GPU, tests/conftest.py sets ``TRITON_INTERPRET=1`` and the kernels run on CPU
tensors in Triton's interpreter (inputs <= 1e5 elements to stay within CI time). With a
GPU the same cases run on CUDA tensors and through the registered ``torch.ops.dgp.*``
CUDA kernels; the device that is not available skips with its reason.
"""

import dataclasses
import os
import sys

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton): the Triton kernels cannot run"
)

import triton.language as tl  # noqa: E402

import dgp_kernels  # noqa: E402
from dgp_kernels.ops import reference  # noqa: E402
from dgp_kernels.kernels.triton import ops as T  # noqa: E402
from dgp_kernels.kernels.triton.common import f32_to_bf16_rne  # noqa: E402
from dgp_kernels.kernels.triton.launch import CallInfo  # noqa: E402
from dgp_kernels.kernels.triton.tuning import DEFAULT, Tuning  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
HAS_CPP = dgp_kernels.backend_info().cpu == "cpp"

# The device the kernels run on here: CPU tensors in the interpreter (no GPU: set by
# tests/conftest.py), or CUDA tensors. Only that one is generated, so a CPU run collects
# no CUDA-only variants (and reports no skips for them).
DEVICES = ["cpu"] if INTERPRET else (["cuda"] if HAS_CUDA else [])
if not DEVICES:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set: nothing can run the Triton "
                "kernels (tests/conftest.py sets it when there is no GPU)",
                allow_module_level=True)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_INT = {torch.float32: torch.int32, torch.float64: torch.int64,
        torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern on the CPU, so ``-0.0 != +0.0`` and NaN payloads count."""
    return x.detach().cpu().contiguous().view(_INT[x.dtype])


def assert_same(a, b, what=""):
    """Bitwise equality of tensors (or tuples of tensors), dtype and shape included."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.is_floating_point():
        assert torch.equal(bits(a), bits(b)), what
    else:
        assert torch.equal(a.cpu(), b.cpu()), what


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _perm(x, seed=0):
    return x[torch.randperm(x.numel(), generator=_gen(seed))]


# Each case makes a float64 CPU tensor (cast to the dtype under test) and a (top, keep).
def _randn(n, seed=0):
    return torch.randn(n, generator=_gen(seed), dtype=torch.float64)


def _many_zeros(n=4000):
    x = _randn(n, 1)
    x[torch.rand(n, generator=_gen(2)) < 0.9] = 0.0
    return x


def _signed_zeros(n=500):
    x = torch.zeros(n, dtype=torch.float64)
    x[torch.rand(n, generator=_gen(3)) < 0.5] = -0.0
    x[::97] = 1.5  # a few non-zeros so the band crosses the zeros
    return x


def _infs(n=1000):
    x = _randn(n, 4)
    x[::37] = float("inf")
    x[5::41] = float("-inf")
    return x


def _tie_band(n=1000):
    # 20 large, 800 equal, 180 small: ranks 50 and 249 both fall inside the 800 ties.
    return _perm(torch.cat([torch.full((20,), 10.0), torch.full((800,), -1.0),
                            torch.full((180,), 0.25)]).double(), 5)


def _quantized(n=5000):
    return torch.randint(-4, 5, (n,), generator=_gen(6)).double() * 0.5


def _subnormal(n=2000):
    return _randn(n, 7) * 1e-310  # rescaled per dtype in _make


CASES = {
    "randn": (lambda: _randn(3000), 0.05, 0.20),
    "randn_2chunks": (lambda: _randn(100_000, 8), 0.05, 0.20),  # > CHUNK, many blocks
    "all_equal": (lambda: torch.full((5000,), 0.75, dtype=torch.float64), 0.05, 0.20),
    "many_zeros": (_many_zeros, 0.05, 0.20),
    "signed_zeros": (_signed_zeros, 0.05, 0.20),
    "infs": (_infs, 0.05, 0.20),
    "tie_band": (_tie_band, 0.05, 0.20),
    "quantized": (_quantized, 0.10, 0.30),
    "subnormal": (_subnormal, 0.05, 0.20),
    "n7": (lambda: _randn(7, 9), 0.2, 0.5),
    "n31": (lambda: _randn(31, 10), 0.05, 0.20),
    "n1_keep": (lambda: _randn(1, 11), 0.0, 1.0),  # top + keep = 1 on one entry
    "n1_drop": (lambda: _randn(1, 11), 0.05, 0.20),  # k_keep = 0
    "empty": (lambda: torch.empty(0, dtype=torch.float64), 0.05, 0.20),
    "top0": (lambda: _randn(1000, 12), 0.0, 0.20),
    "keep0": (lambda: _randn(1000, 13), 0.05, 0.0),
    "sum1": (lambda: _randn(1000, 14), 0.3, 0.7),  # 0.3 + 0.7 = 1 (float error absorbed)
    "keep_all": (lambda: _randn(1000, 15), 0.0, 1.0),
}


def _make(case, dtype, device):
    fn, top, keep = CASES[case]
    x = fn()
    if case == "subnormal":  # subnormal in the dtype under test, plus a few normals
        x = x / 1e-310 * torch.finfo(dtype).tiny * 0.25
        x[::50] *= 1e3
    return x.to(dtype).to(device), top, keep


def _residual_like(g, seed):
    return (torch.randn(g.shape, generator=_gen(seed), dtype=torch.float64) * 0.5).to(
        g.dtype).to(g.device)


def _check_single(g, top, keep, residual_seed, tuning=DEFAULT):
    """All four single-tensor ops vs the reference on the same input."""
    g_cpu = g.cpu()
    t = dict(tuning=tuning)
    assert_same(T.select_triton(g, top, keep, **t), reference.select(g_cpu, top, keep), "select")
    assert_same(T.prune_triton(g, top, keep, **t), reference.prune(g_cpu, top, keep), "prune")
    a, b = g.clone(), g_cpu.clone()
    T.prune_inplace_triton(a, top, keep, **t)
    reference.prune_(b, top, keep)
    assert_same(a, b, "prune_")
    for e in (torch.zeros_like(g), _residual_like(g, residual_seed)):
        e_ours, e_ref = e.clone(), e.cpu().clone()
        got = T.select_ef_triton(g, e_ours, top, keep, **t)
        want = reference.select_ef(g_cpu, e_ref, top, keep)
        assert_same(got, want, "select_ef")
        assert_same(e_ours, e_ref, "select_ef residual")


# Every way to the boundaries, forced by a tuning (never by module state). The sampled
# ones use 512-entry samples, so that layers of a few thousand entries are really sampled.
_SAMPLED = dict(path="sampled", sample=512, cand_fraction=2, sample_sigmas=3.0, sample_slack=4)
FORCED = {
    # exact first-digit histogram, then refinement over a candidate buffer / over the data
    "candidates": Tuning(path="candidates"),
    "data": Tuning(path="data"),
    # narrower margins than the defaults, which around rank 5% of a 512-entry sample would
    # reach the sample's end: the range would run to the top digit, too wide, and every
    # layer would be rerun exactly
    "sampled": Tuning(**_SAMPLED),
    # no margins: the sample often misses and the exact rerun runs
    "sampled_tight": Tuning(**dict(_SAMPLED, sample_sigmas=0.0, sample_slack=0)),
    # a second slot of 16 keys: the one-program tail overflows and the layer is rerun
    "sampled_tail": Tuning(**dict(_SAMPLED, tail_min=16)),
    # blocks of 512 and look-back windows of 16: many blocks per layer
    "sampled_blocks": Tuning(**dict(_SAMPLED, block=512, lookback=16, num_warps=4)),
    "candidates_blocks": Tuning(path="candidates", block=512, lookback=16, tile=512,
                                chunk_tiles=2, cand_chunk_tiles=1),
}


@pytest.fixture(params=list(FORCED))
def forced_path(request):
    """``(name, tuning)`` of one forced way to the boundaries."""
    return request.param, FORCED[request.param]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_single_ops_match_reference(device, dtype, case):
    g, top, keep = _make(case, dtype, device)
    if case == "randn_2chunks" and dtype != torch.float32 and device == "cpu":
        g = g[:20_000]  # the multi-chunk path is covered by float32; keep CI time down
    _check_single(g, top, keep, residual_seed=hash(case) % 1000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(device, dtype):
    base = _randn(60 * 50, 20).view(60, 50).to(dtype).to(device)
    for g in (base.t(), base[:, ::3], base[::2].t()):
        assert not g.is_contiguous()
        _check_single(g, 0.05, 0.20, residual_seed=21)
        # Non-contiguous residual: written back through its own strides.
        e = _residual_like(base, 22).t()
        if e.shape != g.shape:
            continue
        e_ref = e.cpu().clone()
        got = T.select_ef_triton(g, e, 0.1, 0.3)
        want = reference.select_ef(g.cpu(), e_ref, 0.1, 0.3)
        assert_same(got, want, "select_ef strided")
        assert_same(e, e_ref, "strided residual")


def _layers(dtype, device):
    shapes = [(100,), (0,), (7, 3), (0, 5), (1,), (64, 3, 3, 3), (40, 30), (2,)]
    out = []
    for i, s in enumerate(shapes):
        x = torch.randn(s, generator=_gen(30 + i), dtype=torch.float64)
        if i == 6:
            x = x.round()  # ties across the boundaries of one layer
        out.append(x.to(dtype).to(device))
    out[6] = out[6].t()  # one non-contiguous layer
    return out


def _check_multi(gs, top, keep, tuning=DEFAULT, info=None, residual_seed=40):
    gs_cpu = [g.cpu() for g in gs]
    assert_same(T.select_multi_triton(gs, top, keep, tuning=tuning),
                reference.select_multi(gs_cpu, top, keep), "select_multi")
    es = [_residual_like(g, residual_seed + i) for i, g in enumerate(gs)]
    es_ref = [e.cpu().clone() for e in es]
    got = T.select_ef_multi_triton(gs, es, top, keep, tuning=tuning, info=info)
    want = reference.select_ef_multi(gs_cpu, es_ref, top, keep)
    assert_same(got, want, "select_ef_multi")
    assert_same(es, es_ref, "select_ef_multi residuals")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top,keep", [(0.05, 0.20), (0.0, 1.0), (0.1, 0.0)])
def test_multi_ops_match_reference(device, dtype, top, keep):
    _check_multi(_layers(dtype, device), top, keep)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_empty_list(device):
    assert_same(T.select_multi_triton([], 0.05, 0.2), reference.select_multi([], 0.05, 0.2))
    assert_same(T.select_ef_multi_triton([], [], 0.05, 0.2),
                reference.select_ef_multi([], [], 0.05, 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_float16_overflow_in_error_feedback(device):
    # 60000 + 10000 rounds to inf in float16 exactly as torch's add does.
    g = torch.full((300,), 60000.0, dtype=torch.float16, device=device)
    g[::2] = -1.0
    e = torch.full_like(g, 10000.0)
    e_ref = e.cpu().clone()
    assert_same(T.select_ef_triton(g, e, 0.05, 0.2), reference.select_ef(g.cpu(), e_ref, 0.05, 0.2))
    assert_same(e, e_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_raises_and_writes_nothing(device, dtype, forced_path):
    _, tuning = forced_path
    t = dict(tuning=tuning)
    g = _randn(3000, 50).to(dtype).to(device)
    g[1234] = float("nan")
    with pytest.raises(ValueError, match=r"^g contains NaN"):
        T.select_triton(g, 0.05, 0.2, **t)
    g_before = g.clone()
    with pytest.raises(ValueError, match=r"^g contains NaN"):
        T.prune_inplace_triton(g, 0.05, 0.2, **t)
    assert_same(g, g_before, "prune_ on NaN")

    # inf - inf in g + residual, in the third layer: every residual is left untouched.
    big = 70_000 if dtype == torch.float32 else 5000
    gs = [_randn(n, 51 + n).to(dtype).to(device) for n in (500, 0, big)]
    gs[2][-3] = float("inf")
    es = [_residual_like(x, 60) for x in gs]
    es[2][-3] = float("-inf")
    before = [e.clone() for e in es]
    with pytest.raises(ValueError) as exc:
        T.select_ef_multi_triton(gs, es, 0.05, 0.2, **t)
    with pytest.raises(ValueError) as exc_ref:
        reference.select_ef_multi([x.cpu() for x in gs], [e.cpu().clone() for e in es], 0.05, 0.2)
    assert str(exc.value) == str(exc_ref.value)
    assert str(exc.value).startswith("gs[2] + residuals[2] contains NaN")
    assert_same(es, before, "residuals after NaN")
    with pytest.raises(ValueError, match=r"^g \+ residual contains NaN"):
        T.select_ef_triton(gs[2], es[2], 0.05, 0.2, **t)
    assert_same(es[2], before[2], "residual after NaN")
    with pytest.raises(ValueError, match=r"^gs\[2\] contains NaN"):
        T.select_multi_triton([gs[0], gs[1], g], 0.05, 0.2, **t)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    g = torch.randn(10, device=device)
    with pytest.raises(ValueError, match="top \\+ keep"):
        T.select_triton(g, 0.9, 0.2)
    with pytest.raises(TypeError, match="dtype"):
        T.select_triton(g.to(torch.int32), 0.05, 0.2)
    with pytest.raises(ValueError, match="residuals\\[0\\] must match"):
        T.select_ef_multi_triton([g], [g[:5].clone()], 0.05, 0.2)


def test_bad_tunings():
    with pytest.raises(ValueError, match="Tuning.path"):
        Tuning(path="fast")
    with pytest.raises(ValueError, match="Tuning.block"):
        Tuning(block=4096)
    with pytest.raises(ValueError, match="Tuning.lookback"):
        Tuning(lookback=12)
    with pytest.raises(ValueError, match="Tuning.fine_bits"):
        Tuning(fine_bits=9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.block = 1024


@pytest.mark.skipif(not HAS_CPP, reason="the C++ CPU kernel (dgp_kernels._C) is not built: "
                    "`pip install --no-build-isolation -e .`")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["randn", "all_equal", "many_zeros", "tie_band", "infs", "n7"])
def test_matches_cpp_kernel(device, dtype, case):
    g, top, keep = _make(case, dtype, device)
    g_cpu = g.cpu()
    assert_same(T.select_triton(g, top, keep), torch.ops.dgp.select(g_cpu, top, keep))
    e = _residual_like(g, 70)
    e_cpp = e.cpu().clone()
    assert_same(T.select_ef_triton(g, e, top, keep), torch.ops.dgp.select_ef(g_cpu, e_cpp, top, keep))
    assert_same(e, e_cpp)
    if case == "randn":
        gs = _layers(dtype, device)
        assert_same(T.select_multi_triton(gs, top, keep),
                    torch.ops.dgp.select_multi([x.cpu() for x in gs], top, keep))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the CUDA dispatch key is never hit")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_registered_cuda_ops(dtype):
    assert dgp_kernels.backend_info().cuda == "triton"
    g = _randn(50_000, 80).to(dtype).cuda()
    assert_same(dgp_kernels.select(g), reference.select(g.cpu()))
    assert_same(dgp_kernels.prune(g), reference.prune(g.cpu()))
    e = _residual_like(g, 81)
    e_ref = e.cpu().clone()
    assert_same(dgp_kernels.select_ef(g, e), reference.select_ef(g.cpu(), e_ref))
    assert_same(e, e_ref)
    gs = _layers(dtype, "cuda")
    assert_same(dgp_kernels.select_multi(gs), reference.select_multi([x.cpu() for x in gs]))


def test_register_without_triton_registers_nothing(monkeypatch):
    import importlib

    pkg = importlib.import_module("dgp_kernels.kernels.triton")
    ops_select = importlib.import_module("dgp_kernels.ops.select")

    calls = []
    monkeypatch.setattr(ops_select._lib, "impl", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert pkg.register() is False
    assert calls == []
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.delitem(sys.modules, "triton")
    assert pkg.register() is False  # CPU-only torch: nothing can reach the CUDA key
    assert calls == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["randn", "all_equal", "many_zeros", "tie_band", "quantized",
                                  "keep0"])
def test_every_boundary_path(device, dtype, case, forced_path):
    name, tuning = forced_path
    g, top, keep = _make(case, dtype, device)
    e = _residual_like(g, 90) if case == "randn" else torch.zeros_like(g)
    e_ref = e.cpu().clone()
    info = CallInfo()
    assert_same(T.select_ef_triton(g, e, top, keep, tuning=tuning, info=info),
                reference.select_ef(g.cpu(), e_ref, top, keep))
    assert_same(e, e_ref)
    assert info.path == ("sampled" if name.startswith("sampled") else "exact")
    if name in ("sampled", "sampled_blocks") and case in ("randn", "keep0"):
        assert info.missed == [], "the sample of a tie-free layer should hold both boundaries"
    if case == "randn":  # layers with empty and tie-heavy members, on every path
        gs = _layers(dtype, device)
        assert_same(T.select_multi_triton(gs, top, keep, tuning=tuning),
                    reference.select_multi([x.cpu() for x in gs], top, keep))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(int(os.environ.get("DGP_FUZZ_SEEDS", "4"))))
def test_random_configurations(device, seed, forced_path):
    """Random layer lists (sizes, dtype, value mix, top/keep) on every boundary path.
    ``DGP_FUZZ_SEEDS=100`` runs more."""
    _, tuning = forced_path
    gen = _gen(1000 + seed)
    dtype = DTYPES[seed % len(DTYPES)]
    sizes = torch.randint(0, 3000, (int(torch.randint(1, 6, (1,), generator=gen)),),
                          generator=gen).tolist()
    gs = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** (i - 2)
        mix = torch.rand(n, generator=gen)
        x[mix < 0.2] = 0.0
        x[(mix >= 0.2) & (mix < 0.35)] = x[(mix >= 0.2) & (mix < 0.35)].round()
        gs.append(x.to(dtype).to(device))
    top = float(torch.rand(1, generator=gen)) * 0.5
    keep = float(torch.rand(1, generator=gen)) * (1.0 - top)
    _check_multi(gs, top, keep, tuning=tuning, residual_seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampled_path_reruns_missed_layers(device, dtype):
    """Layers whose candidate slot overflows (all equal, few distinct values) are skipped by
    the sampled path and rerun on the exact path; the others keep their sampled result."""
    tuning = FORCED["sampled"]
    gs = [_randn(3000, 1), torch.full((2000,), 0.5, dtype=torch.float64), _randn(5000, 2),
          torch.empty(0, dtype=torch.float64), _randn(4000, 3).round()]
    gs = [g.to(dtype).to(device) for g in gs]
    gs_cpu = [g.cpu() for g in gs]
    es = [torch.zeros_like(g) for g in gs]  # keep the ties: v = g
    es_ref = [e.cpu().clone() for e in es]
    info = CallInfo()
    assert_same(T.select_ef_multi_triton(gs, es, 0.05, 0.2, tuning=tuning, info=info),
                reference.select_ef_multi(gs_cpu, es_ref, 0.05, 0.2))
    assert_same(es, es_ref)
    assert_same(T.select_multi_triton(gs, 0.1, 0.3, tuning=tuning),
                reference.select_multi(gs_cpu, 0.1, 0.3))
    if dtype in (torch.float32, torch.bfloat16):
        assert info.missed == [1, 4], info.missed
    elif dtype == torch.float16:  # 64 first digits per octave: with a 512-entry sample the
        assert {1, 4} <= set(info.missed), info.missed  # randn ranges may be too wide
    # (float64's octave-wide buckets overflow the randn layers' slots too)
    # the rerun is the exact path's launches after the sampled ones, and one more sync
    assert info.syncs == 2 and info.launches.count("hist_kernel") == 1


@triton.jit
def _round_bf16_probe(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, f32_to_bf16_rne(x).to(tl.int16, bitcast=True))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_rounding_of_every_nan_pattern(device):
    """float32 -> bfloat16 in integers matches torch on NaNs of every payload (the GPU's
    canonical NaN 0x7FFFFFFF once rounded to -0.0 and hid ``inf - inf`` in g + e), on
    infinities, on ties to even and on values that round up to inf."""
    pats = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF,
            0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x3F80FFFF,
            0x00000001, 0x80000000, 0x00007FFF, 0x7F7F8000]
    pats += torch.randint(0, 2**32, (112,), generator=_gen(9), dtype=torch.int64).tolist()
    x = torch.tensor(pats, dtype=torch.int64).to(torch.int32).view(torch.float32)
    y = torch.empty(128, dtype=torch.int16)
    xd, yd = x.to(device), y.to(device)
    _round_bf16_probe[(1,)](xd, yd, N=128)
    got = yd.cpu()
    want = x.to(torch.bfloat16).view(torch.int16)
    nan_got = (got.to(torch.int32) & 0x7FFF) > 0x7F80
    nan_want = (want.to(torch.int32) & 0x7FFF) > 0x7F80
    assert torch.equal(nan_got, nan_want)
    assert torch.equal(got[~nan_want], want[~nan_want])
    assert torch.all(got[nan_want] == 0x7FC0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tuning", [
    Tuning(block=512, num_warps=4),
    Tuning(block=1024, lookback=64),
    Tuning(cand_chunk_tiles=2, sample_split=3, tile=1024),
    Tuning(fine_bits=0),  # whole first digits as sample ranges
    Tuning(sample=2048, sample_sigmas=8.0, sample_slack=32, tail_min=64),
], ids=lambda t: ",".join(f"{f.name}={getattr(t, f.name)}" for f in dataclasses.fields(t)
                          if getattr(t, f.name) != getattr(DEFAULT, f.name)))
def test_tunings_do_not_change_bits(device, tuning):
    """The settings the GPU sweep varies change how work is split, never the result: a
    multi-layer list with a layer spanning many blocks, on the default (sampled) path."""
    gs = [_randn(n, 400 + n).to(torch.float32).to(device) for n in (9000, 3, 0, 20_000)]
    info = CallInfo()
    _check_multi(gs, 0.05, 0.2, tuning=tuning, info=info, residual_seed=401)
    assert info.path == "sampled"
