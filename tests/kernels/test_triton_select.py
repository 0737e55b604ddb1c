"""Triton band selection vs the reference (and the C++ CPU kernel), bit for bit.

Without a GPU, tests/conftest.py sets ``TRITON_INTERPRET=1`` and the kernels run on CPU
tensors in Triton's interpreter (inputs <= 1e5 elements to stay within CI time). With a
GPU the same cases run on CUDA tensors and through the registered ``torch.ops.dgp.*``
CUDA kernels; the device that is not available skips with its reason.
"""

import os
import re
import sys

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton): the Triton kernels cannot run"
)

import triton.language as tl  # noqa: E402

import dgp_kernels  # noqa: E402
from dgp_kernels.ops import reference  # noqa: E402
from dgp_kernels.kernels.triton import select as ts  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
HAS_CPP = dgp_kernels.backend_info().cpu == "cpp"

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRET,
            reason="CPU tensors run Triton kernels only under TRITON_INTERPRET=1 "
            "(tests/conftest.py sets it when there is no GPU)",
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not HAS_CUDA or INTERPRET,
            reason="no CUDA device: the Triton kernels are checked on CPU tensors in the "
            "interpreter instead",
        ),
    ),
]
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


def _check_single(g, top, keep, residual_seed):
    """All four single-tensor ops vs the reference on the same input."""
    g_cpu = g.cpu()
    assert_same(ts.select_triton(g, top, keep), reference.select(g_cpu, top, keep), "select")
    assert_same(ts.prune_triton(g, top, keep), reference.prune(g_cpu, top, keep), "prune")
    a, b = g.clone(), g_cpu.clone()
    ts.prune_inplace_triton(a, top, keep)
    reference.prune_(b, top, keep)
    assert_same(a, b, "prune_")
    for e in (torch.zeros_like(g), _residual_like(g, residual_seed)):
        e_ours, e_ref = e.clone(), e.cpu().clone()
        got = ts.select_ef_triton(g, e_ours, top, keep)
        want = reference.select_ef(g_cpu, e_ref, top, keep)
        assert_same(got, want, "select_ef")
        assert_same(e_ours, e_ref, "select_ef residual")


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
        got = ts.select_ef_triton(g, e, 0.1, 0.3)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top,keep", [(0.05, 0.20), (0.0, 1.0), (0.1, 0.0)])
def test_multi_ops_match_reference(device, dtype, top, keep):
    gs = _layers(dtype, device)
    gs_cpu = [g.cpu() for g in gs]
    assert_same(ts.select_multi_triton(gs, top, keep), reference.select_multi(gs_cpu, top, keep),
                "select_multi")
    es = [_residual_like(g, 40 + i) for i, g in enumerate(gs)]
    es_ref = [e.cpu().clone() for e in es]
    got = ts.select_ef_multi_triton(gs, es, top, keep)
    want = reference.select_ef_multi(gs_cpu, es_ref, top, keep)
    assert_same(got, want, "select_ef_multi")
    assert_same(es, es_ref, "select_ef_multi residuals")


@pytest.mark.parametrize("device", DEVICES)
def test_multi_empty_list(device):
    assert_same(ts.select_multi_triton([], 0.05, 0.2), reference.select_multi([], 0.05, 0.2))
    assert_same(ts.select_ef_multi_triton([], [], 0.05, 0.2),
                reference.select_ef_multi([], [], 0.05, 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_float16_overflow_in_error_feedback(device):
    # 60000 + 10000 rounds to inf in float16 exactly as torch's add does.
    g = torch.full((300,), 60000.0, dtype=torch.float16, device=device)
    g[::2] = -1.0
    e = torch.full_like(g, 10000.0)
    e_ref = e.cpu().clone()
    assert_same(ts.select_ef_triton(g, e, 0.05, 0.2), reference.select_ef(g.cpu(), e_ref, 0.05, 0.2))
    assert_same(e, e_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_raises_and_writes_nothing(device, dtype, forced_path):
    g = _randn(3000, 50).to(dtype).to(device)
    g[1234] = float("nan")
    with pytest.raises(ValueError, match=r"^g contains NaN"):
        ts.select_triton(g, 0.05, 0.2)
    g_before = g.clone()
    with pytest.raises(ValueError, match=r"^g contains NaN"):
        ts.prune_inplace_triton(g, 0.05, 0.2)
    assert_same(g, g_before, "prune_ on NaN")

    # inf - inf in g + residual, in the third layer: every residual is left untouched.
    gs = [_randn(n, 51 + n).to(dtype).to(device) for n in (500, 0, 70_000 if dtype == torch.float32 else 5000)]
    gs[2][-3] = float("inf")
    es = [_residual_like(x, 60) for x in gs]
    es[2][-3] = float("-inf")
    before = [e.clone() for e in es]
    with pytest.raises(ValueError) as exc:
        ts.select_ef_multi_triton(gs, es, 0.05, 0.2)
    with pytest.raises(ValueError) as exc_ref:
        reference.select_ef_multi([x.cpu() for x in gs], [e.cpu().clone() for e in es], 0.05, 0.2)
    assert str(exc.value) == str(exc_ref.value)
    assert str(exc.value).startswith("gs[2] + residuals[2] contains NaN")
    assert_same(es, before, "residuals after NaN")
    with pytest.raises(ValueError, match=r"^g \+ residual contains NaN"):
        ts.select_ef_triton(gs[2], es[2], 0.05, 0.2)
    assert_same(es[2], before[2], "residual after NaN")
    with pytest.raises(ValueError, match=r"^gs\[2\] contains NaN"):
        ts.select_multi_triton([gs[0], gs[1], g], 0.05, 0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    g = torch.randn(10, device=device)
    with pytest.raises(ValueError, match="top \\+ keep"):
        ts.select_triton(g, 0.9, 0.2)
    with pytest.raises(TypeError, match="dtype"):
        ts.select_triton(g.to(torch.int32), 0.05, 0.2)
    with pytest.raises(ValueError, match="residuals\\[0\\] must match"):
        ts.select_ef_multi_triton([g], [g[:5].clone()], 0.05, 0.2)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ CPU kernel (dgp_kernels._C) is not built: "
                    "`pip install --no-build-isolation -e .`")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["randn", "all_equal", "many_zeros", "tie_band", "infs", "n7"])
def test_matches_cpp_kernel(device, dtype, case):
    g, top, keep = _make(case, dtype, device)
    g_cpu = g.cpu()
    assert_same(ts.select_triton(g, top, keep), torch.ops.dgp.select(g_cpu, top, keep))
    e = _residual_like(g, 70)
    e_cpp = e.cpu().clone()
    assert_same(ts.select_ef_triton(g, e, top, keep), torch.ops.dgp.select_ef(g_cpu, e_cpp, top, keep))
    assert_same(e, e_cpp)
    if case == "randn":
        gs = _layers(dtype, device)
        assert_same(ts.select_multi_triton(gs, top, keep),
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


@pytest.fixture(params=[f"{p}{f}" for f in ("", "+fused") for p in (
    "candidates", "data", "sampled", "sampled_tight", "sampled_wide")] + [
    f"{p}+persistent" for p in ("candidates", "data", "sampled", "sampled_tight")] + [
    "sampled+fused+persistent"])
def forced_path(request, monkeypatch):
    """Force how phases 1-2 find the boundaries: exact histogram + candidate buffer, exact
    histogram + refinement over the data, or the sampled path (small samples, so layers of
    a few thousand entries are really sampled; ``sampled_tight`` without margins, so the
    sample often misses and the exact fallback runs; ``sampled_wide`` treats every digit
    range as too wide for the relative first-digit histogram, so the 2^11-bin one runs). Returns the path and a list that
    records, per call of the sampled path, whether the sample held the boundaries of every
    layer. ``+fused``: the same with FUSE_TAILS (each per-layer step in the last program of
    the launch before it); ``+persistent``: gather and write passes of 3 programs that loop
    over blocks of 512 (PERSISTENT), superblocks of 4 blocks."""
    outcomes = []
    path, *options = request.param.split("+")
    monkeypatch.setattr(ts, "FUSE_TAILS", "fused" in options)
    if "persistent" in options:
        monkeypatch.setattr(ts, "PERSISTENT", 3)
        monkeypatch.setattr(ts, "BLOCK", 512)
        monkeypatch.setattr(ts, "SUPER", 4)  # several superblocks per layer
    if path.startswith("sampled"):
        monkeypatch.setattr(ts, "SAMPLED_MIN_TOTAL", 0)
        monkeypatch.setattr(ts, "SAMPLED_DTYPES", tuple(DTYPES))  # float64 too, for coverage
        monkeypatch.setattr(ts, "SAMPLE", 512)
        monkeypatch.setattr(ts, "CAND_FRACTION", 2)
        if path == "sampled_tight":
            monkeypatch.setattr(ts, "SAMPLE_SIGMAS", 0.0)
            monkeypatch.setattr(ts, "SAMPLE_SLACK", 0)
        elif path == "sampled":
            # narrower margins than the defaults, which around rank 5% of a 512-entry sample
            # would reach the sample's end: the range would run to the top digit, too wide
            # for the relative first digit, and every layer would take the fallback
            monkeypatch.setattr(ts, "SAMPLE_SIGMAS", 3.0)
            monkeypatch.setattr(ts, "SAMPLE_SLACK", 4)
        if path == "sampled_wide":
            monkeypatch.setattr(ts, "REL_FIRST_DIGIT", False)
        monkeypatch.setattr(ts, "_record_sampled", lambda missed: outcomes.append(not missed))
    else:
        monkeypatch.setattr(ts, "SAMPLED_MIN_TOTAL", 1 << 62)
        if path == "candidates":
            monkeypatch.setattr(ts, "CAND_MIN", 1 << 62)
        else:
            monkeypatch.setattr(ts, "CAND_MIN", -1)
            monkeypatch.setattr(ts, "CAND_FRACTION", 1 << 62)
    return path, outcomes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["randn", "all_equal", "many_zeros", "tie_band", "quantized",
                                  "keep0"])
def test_every_boundary_path(device, dtype, case, forced_path):
    g, top, keep = _make(case, dtype, device)
    e = _residual_like(g, 90) if case == "randn" else torch.zeros_like(g)
    e_ref = e.cpu().clone()
    assert_same(ts.select_ef_triton(g, e, top, keep), reference.select_ef(g.cpu(), e_ref, top, keep))
    assert_same(e, e_ref)
    if case == "randn":  # layers with empty and tie-heavy members, on every path
        gs = _layers(dtype, device)
        assert_same(ts.select_multi_triton(gs, top, keep),
                    reference.select_multi([x.cpu() for x in gs], top, keep))
    path, outcomes = forced_path
    if path == "sampled" and case in ("randn", "keep0"):
        # (outcomes[1], the layer list, may miss: its rounded layer overflows a slot)
        assert outcomes[0], "the sample of a tie-free layer should hold both boundaries"


def test_kernels_compile_for_sm90():
    """Every kernel variant lowers through Triton's real compiler and ptxas for sm_90,
    which the interpreter never exercises (runs in a subprocess without TRITON_INTERPRET)."""
    import subprocess

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no NVIDIA backend to compile with: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice
    proc = subprocess.run(
        [sys.executable, "-m", "dgp_kernels.kernels.triton.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failures" in proc.stdout
    # the static resource report (registers, spills, SASS size) of one variant, with a
    # module constant changed first
    proc = subprocess.run(
        [sys.executable, "-m", "dgp_kernels.kernels.triton.compile_check", "--resources",
         "--set", "BLOCK=1024", "--match", "write float32 ef=1 sparse=1 aligned=1 persist=0"],
        env=env, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("ok")]
    assert len(line) == 1 and re.search(r"regs=\d+ stack=\d+ local=\d+ sass=\d+$", line[0]), line


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(int(os.environ.get("DGP_FUZZ_SEEDS", "4"))))
def test_random_configurations(device, seed, forced_path):
    """Random layer lists (sizes, dtype, value mix, top/keep) on every boundary path.
    ``DGP_FUZZ_SEEDS=120`` runs more (480 configurations passed, ~4 min, when written)."""
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
    gs_cpu = [g.cpu() for g in gs]
    assert_same(ts.select_multi_triton(gs, top, keep), reference.select_multi(gs_cpu, top, keep))
    es = [_residual_like(g, seed) for g in gs]
    es_ref = [e.cpu().clone() for e in es]
    assert_same(ts.select_ef_multi_triton(gs, es, top, keep),
                reference.select_ef_multi(gs_cpu, es_ref, top, keep))
    assert_same(es, es_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["", "fused"])
def test_sampled_path_reruns_missed_layers(device, dtype, fused, monkeypatch):
    """Layers whose candidate slot overflows (all equal, few distinct values) are skipped by
    the sampled tail and rerun on the exact path; the others keep their sampled result."""
    monkeypatch.setattr(ts, "FUSE_TAILS", fused)
    monkeypatch.setattr(ts, "SAMPLED_MIN_TOTAL", 0)
    monkeypatch.setattr(ts, "SAMPLED_DTYPES", tuple(DTYPES))
    monkeypatch.setattr(ts, "SAMPLE", 512)
    monkeypatch.setattr(ts, "CAND_FRACTION", 2)
    monkeypatch.setattr(ts, "SAMPLE_SIGMAS", 3.0)  # (see forced_path: ranges stay narrow)
    monkeypatch.setattr(ts, "SAMPLE_SLACK", 4)
    missed = []
    monkeypatch.setattr(ts, "_record_sampled", missed.append)
    gs = [_randn(3000, 1), torch.full((2000,), 0.5, dtype=torch.float64), _randn(5000, 2),
          torch.empty(0, dtype=torch.float64), _randn(4000, 3).round()]
    gs = [g.to(dtype).to(device) for g in gs]
    gs_cpu = [g.cpu() for g in gs]
    es = [torch.zeros_like(g) for g in gs]  # keep the ties: v = g
    es_ref = [e.cpu().clone() for e in es]
    assert_same(ts.select_ef_multi_triton(gs, es, 0.05, 0.2),
                reference.select_ef_multi(gs_cpu, es_ref, 0.05, 0.2))
    assert_same(es, es_ref)
    assert_same(ts.select_multi_triton(gs, 0.1, 0.3), reference.select_multi(gs_cpu, 0.1, 0.3))
    if dtype in (torch.float32, torch.bfloat16):
        assert missed[0] == [1, 4], missed
    elif dtype == torch.float16:  # 64 first digits per octave: with a 512-entry sample the
        assert {1, 4} <= set(missed[0]), missed  # randn ranges may exceed REL_BINS digits
    # (float64's octave-wide buckets overflow the randn layers' slots too)


@triton.jit
def _round_bf16_probe(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, ts._f32_to_bf16_rne(x).to(tl.int16, bitcast=True))


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


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["", "fused"])
def test_cuda_graph_replays_match_reference(dtype, fused, monkeypatch):
    """USE_CUDA_GRAPHS: the first call per (shapes, mode) runs eagerly, the second captures,
    later ones replay with new tensors (new pointers), NaN still raises with nothing
    written, and layers whose sample misses are still rerun exactly."""
    monkeypatch.setattr(ts, "USE_CUDA_GRAPHS", True)
    monkeypatch.setattr(ts, "FUSE_TAILS", fused)
    monkeypatch.setattr(ts, "SAMPLED_MIN_TOTAL", 0)
    ts._GRAPHS.clear()
    ts._GRAPH_SEEN.clear()
    sizes = (3000, 70_000, 0, 1, 40_000)
    for call in range(5):
        gs = [_randn(n, 200 + 10 * call + i).to(dtype).cuda() for i, n in enumerate(sizes)]
        es = [_residual_like(g, 300 + call) for g in gs]
        es_ref = [e.cpu().clone() for e in es]
        assert_same(ts.select_ef_multi_triton(gs, es, 0.05, 0.2),
                    reference.select_ef_multi([g.cpu() for g in gs], es_ref, 0.05, 0.2))
        assert_same(es, es_ref)
        assert_same(ts.select_multi_triton(gs, 0.1, 0.3),
                    reference.select_multi([g.cpu() for g in gs], 0.1, 0.3))
    assert len(ts._GRAPHS) >= 2  # one per mode (with and without error feedback)
    gs[1][777] = float("nan")
    before = [e.clone() for e in es]
    with pytest.raises(ValueError, match=r"^gs\[1\]"):
        ts.select_ef_multi_triton(gs, es, 0.05, 0.2)
    assert_same(es, before, "residuals after NaN")
    gs[1][777] = 0.5
    gs[0].fill_(0.25)  # all equal: its candidate slot overflows, the layer is rerun exactly
    es_ref = [e.cpu().clone() for e in es]
    assert_same(ts.select_ef_multi_triton(gs, es, 0.05, 0.2),
                reference.select_ef_multi([g.cpu() for g in gs], es_ref, 0.05, 0.2))
    assert_same(es, es_ref)


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="CUDA graphs need a CUDA device")
def test_inside_a_user_cuda_graph_capture_raises_clearly():
    """Each call reads flags back to the host, which a capture cannot hold: a clear error
    before anything is queued, and the op still works after the capture."""
    g = _randn(5000, 11).float().cuda()
    e = _residual_like(g, 12)
    ts.select_ef_triton(g, e.clone(), 0.05, 0.2)  # compiled outside the capture
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ts.select_ef_triton(g, e, 0.05, 0.2)
    torch.cuda.synchronize()
    e_ref = e.cpu().clone()
    assert_same(ts.select_ef_triton(g, e, 0.05, 0.2),
                reference.select_ef(g.cpu(), e_ref, 0.05, 0.2))


@pytest.mark.skipif(not HAS_CUDA or INTERPRET or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_tensors_on_a_device_that_is_not_current():
    """Triton launches on the current device: the launcher switches to the tensors' own."""
    gs = [_randn(n, 13 + n).float().to("cuda:1") for n in (3000, 2_000_000)]
    es = [_residual_like(g, 14) for g in gs]
    es_ref = [e.cpu().clone() for e in es]
    with torch.cuda.device(0):
        got = ts.select_ef_multi_triton(gs, es, 0.05, 0.2)
    assert got[0].device == torch.device("cuda:1")
    assert_same(got, reference.select_ef_multi([g.cpu() for g in gs], es_ref, 0.05, 0.2))
    assert_same(es, es_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("knobs", [
    dict(BLOCK=512, NUM_WARPS=4),
    dict(BLOCK=1024, SCAN_TILE=1024, SCAN_WARPS=4),
    dict(CAND_CHUNK=4096, SAMPLE_SPLIT=3),
    # fused tails whose per-layer scans step through several tiles
    dict(FUSE_TAILS=True, BLOCK=512, FUSED_SCAN_TILE=16, CAND_CHUNK=2048),
    dict(FUSE_TAILS=False, BLOCK=512, SCAN_TILE=16),
    dict(PERSISTENT=2, BLOCK=512, PIPELINE_STAGES=2),
    dict(PERSISTENT=5, FUSE_TAILS=True, BLOCK=1024),
    # superblocks of a few blocks, scanned a few at a time
    dict(SUPER=2, BLOCK=512, SCAN_TILE=4),
    dict(SUPER=4, BLOCK=512, FUSE_TAILS=True, FUSED_SCAN_TILE=2),
    dict(COMPACT_CANDIDATES=False, FINE_BITS=0),  # whole first digits as sample ranges
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_launch_constants_do_not_change_bits(device, knobs, monkeypatch):
    """The tuning constants bench/gpu_profile.py sweeps change how work is split, never the
    result: sampled and exact paths, a multi-layer list with a layer spanning many blocks."""
    monkeypatch.setattr(ts, "SAMPLED_MIN_TOTAL", 0)
    monkeypatch.setattr(ts, "SAMPLE", 2048)
    for name, value in knobs.items():
        monkeypatch.setattr(ts, name, value)
    ts._PLANS.clear()
    gs = [_randn(n, 400 + n).to(torch.float32).to(device) for n in (9000, 3, 0, 20_000)]
    es = [_residual_like(g, 401) for g in gs]
    es_ref = [e.cpu().clone() for e in es]
    want = reference.select_ef_multi([g.cpu() for g in gs], es_ref, 0.05, 0.2)
    assert_same(ts.select_ef_multi_triton(gs, es, 0.05, 0.2), want)
    assert_same(es, es_ref)
    assert_same(ts.select_multi_triton(gs, 0.1, 0.3),
                reference.select_multi([g.cpu() for g in gs], 0.1, 0.3))
    ts._PLANS.clear()


class _CountLaunches:
    """Stands in for a Triton kernel in ``ts``: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.kernel.fn.__name__)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused,persistent,expected", [
    (False, 0, ["_sample_kernel", "_range_kernel", "_gather_kernel", "_validate_kernel"]
     + ["_refine_kernel", "_locate_kernel"] * 5
     + ["_cand_count_kernel", "_scan_kernel", "_write_kernel"]),
    (True, 0, ["_sample_kernel", "_gather_kernel"] + ["_refine_kernel"] * 5
     + ["_cand_count_kernel", "_write_kernel"]),
    (True, 2, ["_sample_kernel", "_gather_kernel", "_validate_kernel"] + ["_refine_kernel"] * 5
     + ["_cand_count_kernel", "_write_kernel"]),
], ids=["", "fused", "fused+persistent"])
def test_launches_of_a_sampled_call(device, fused, persistent, expected, monkeypatch):
    """The launch sequence of one sampled float32 call with error feedback: 17 launches,
    9 with fused tails (each per-layer step in the last program of the launch before it),
    10 when the gather pass is also persistent (its validation stays a launch), and the
    same bits every way."""
    monkeypatch.setattr(ts, "FUSE_TAILS", fused)
    monkeypatch.setattr(ts, "PERSISTENT", persistent)
    monkeypatch.setattr(ts, "SAMPLED_MIN_TOTAL", 0)
    log = []
    for name in dir(ts):
        if name.endswith("_kernel") and name.startswith("_"):
            monkeypatch.setattr(ts, name, _CountLaunches(getattr(ts, name), log))
    gs = [_randn(n, 500 + n).to(torch.float32).to(device) for n in (6000, 0, 900)]
    es = [_residual_like(g, 501) for g in gs]
    es_ref = [e.cpu().clone() for e in es]
    assert_same(ts.select_ef_multi_triton(gs, es, 0.05, 0.2),
                reference.select_ef_multi([g.cpu() for g in gs], es_ref, 0.05, 0.2))
    assert_same(es, es_ref)
    assert log == expected


@pytest.mark.skipif(not INTERPRET, reason="the interpreter reads the module global at run "
                    "time; a compiled kernel keeps the value it was compiled with")
@pytest.mark.parametrize("sampled", [False, True])
def test_histograms_without_the_native_mask(sampled, monkeypatch):
    """Older Triton has no ``mask=`` in ``tl.histogram``: the workaround (masked lanes to
    bin 0, taken back out) gives the same bits."""
    monkeypatch.setattr(ts, "_HIST_MASK", tl.constexpr(False))
    monkeypatch.setattr(ts, "SAMPLED_MIN_TOTAL", 0 if sampled else 1 << 62)
    monkeypatch.setattr(ts, "SAMPLE", 2048)
    gs = [_randn(n, 700 + n).to(torch.float32) for n in (9000, 5, 0, 20_000)]
    es = [_residual_like(g, 701) for g in gs]
    es_ref = [e.clone() for e in es]
    assert_same(ts.select_ef_multi_triton(gs, es, 0.05, 0.2),
                reference.select_ef_multi(gs, es_ref, 0.05, 0.2))
    assert_same(es, es_ref)
