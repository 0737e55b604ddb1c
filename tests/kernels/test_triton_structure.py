"""What the Triton backend promises about its structure, checked without a GPU.

* launches per call: the sampled path (the default) is at most 6 device launches (one
  memset and five kernels) and one host synchronisation for any number of layers,
  counted independently of the launcher's own record (a hook on Triton's interpreter for
  the kernels, a torch function mode for torch's device work and host reads);
* the look-back prefix of the write pass sums the right predecessors whatever they have
  published (in the interpreter every predecessor has finished, so the multi-window and
  aggregate paths are driven here with hand-made descriptors);
* nothing in the backend reads an environment variable, and no test forces a path by
  changing the backend's module state (tests pass a ``Tuning``).
"""

import ast
import os
import pathlib

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton): the Triton kernels cannot run"
)

import triton.language as tl  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from dgp_kernels.ops import reference  # noqa: E402
from dgp_kernels.kernels.triton import cuda_graphs  # noqa: E402
from dgp_kernels.kernels.triton import graphs as graphs_mod  # noqa: E402
from dgp_kernels.kernels.triton import ops as T  # noqa: E402
from dgp_kernels.kernels.triton.launch import CallInfo  # noqa: E402
from dgp_kernels.kernels.triton.tuning import Tuning  # noqa: E402
from dgp_kernels.kernels.triton.write import _lookback  # noqa: E402

from .test_triton_select import _randn, _residual_like, assert_same  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = pathlib.Path(__file__).resolve().parents[2]
BACKEND = ROOT / "dgp_kernels" / "kernels" / "triton"

# torch calls that queue device work (a kernel or a copy) or read the device from the host
_DEVICE_WORK = {"zeros", "zeros_like", "zero_", "fill_", "copy_", "clone", "__setitem__",
                "cat", "index_copy_", "scatter_", "full", "ones"}
_HOST_READS = {"tolist", "item", "cpu", "numpy"}


class _Counter(TorchFunctionMode):
    """Counts torch's device work and host reads outside Triton kernel launches (the
    interpreter itself uses torch while it runs a kernel)."""

    def __init__(self):
        super().__init__()
        self.inside_kernel = 0
        self.device_work, self.host_reads = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.inside_kernel:
            if name in _DEVICE_WORK:
                self.device_work.append(name)
            elif name in _HOST_READS:
                self.host_reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """``(counter, kernel names)``: every Triton launch through the interpreter's entry
    point (a hook on Triton's class, not on our modules) and torch's device work."""
    from triton.runtime import interpreter

    counter, kernels = _Counter(), []
    run = interpreter.InterpretedFunction.run

    def hooked(self, *args, **kwargs):
        kernels.append(self.fn.__name__)
        counter.inside_kernel += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.inside_kernel -= 1

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", hooked)
    with counter:
        yield counter, kernels


LISTS = {
    "one layer": [60_000],
    "62 layers (ResNet-18-like)": [((i * 37) % 900) + 10 for i in range(62)],
    "161 layers with empty ones": [0 if i % 13 == 0 else ((i * 53) % 400) + 1 for i in range(161)],
}


@pytest.mark.skipif(not INTERPRET, reason="counts launches through Triton's interpreter")
@pytest.mark.parametrize("sizes", list(LISTS.values()), ids=list(LISTS))
def test_sampled_call_is_six_launches_and_one_sync(sizes, counted):
    counter, kernels = counted
    gs = [_randn(n, 7 + i).float() for i, n in enumerate(sizes)]
    es = [_residual_like(g, 3) for g in gs]
    es_ref = [e.clone() for e in es]
    counter.device_work.clear()
    counter.host_reads.clear()
    info = CallInfo()
    got = T.select_ef_multi_triton(gs, es, 0.05, 0.2, info=info)
    launches = len(kernels) + counter.device_work.count("zeros")
    work = [w for w in counter.device_work if w != "zeros"]
    reads = list(counter.host_reads)
    assert info.path == "sampled" and info.missed == []
    assert kernels == ["sample_kernel", "gather_kernel", "refine_kernel", "compact_kernel",
                       "write_kernel"]
    assert launches <= 6 and launches == len(info.launches), (kernels, counter.device_work)
    assert work == [], f"device work outside the kernels: {work}"
    assert reads == ["tolist"] and info.syncs == 1, reads
    assert_same(got, reference.select_ef_multi(gs, es_ref, 0.05, 0.2))
    assert_same(es, es_ref)


@pytest.mark.skipif(not INTERPRET, reason="counts launches through Triton's interpreter")
def test_exact_path_launches(counted):
    """The exact path (float64, or forced): memset, histogram, one host read, gather, one
    refinement per digit (float32: 4), write."""
    counter, kernels = counted
    gs = [_randn(n, 5).float() for n in (3000, 40)]
    info = CallInfo()
    T.select_multi_triton(gs, tuning=Tuning(path="candidates"), info=info)
    assert kernels == ["hist_kernel", "gather_kernel"] + ["refine_kernel"] * 4 + ["write_kernel"]
    assert len(info.launches) == 8 and info.syncs == 1
    assert counter.host_reads.count("tolist") == 1


@triton.jit
def _lookback_probe(desc, NBLK, vid, first, out, LB: tl.constexpr):
    a, b, c = _lookback(desc, NBLK, vid, first, LB)
    tl.store(out, a)
    tl.store(out + 1, b)
    tl.store(out + 2, c)


def _descriptors(counts, inclusive_at, first):
    """Descriptor words of blocks with ``counts[i] = (c0, c1, c2)`` of two layers (the
    second starts at block ``first``); blocks in ``inclusive_at`` have also published their
    inclusive prefix inside their layer."""
    nb = len(counts)
    desc = torch.zeros(3 * nb, dtype=torch.int64)
    valid = 1 << 62
    acc = [0, 0, 0]
    for i, (c0, c1, c2) in enumerate(counts):
        if i == first:
            acc = [0, 0, 0]
        desc[i] = valid | c0 | (c1 << 12) | (c2 << 24)
        acc = [acc[0] + c0, acc[1] + c1, acc[2] + c2]
        if i in inclusive_at:
            desc[nb + i] = valid | (acc[0] << 31) | acc[1]
            desc[2 * nb + i] = valid | acc[2]
    return desc


@pytest.mark.skipif(not INTERPRET, reason="hand-made descriptors on CPU tensors")
@pytest.mark.parametrize("inclusive_at,first", [
    (set(), 0),  # only block counts: walks back over several windows to the layer start
    ({3}, 0),  # an inclusive prefix a few windows back
    ({45}, 0),  # right behind the block
    (set(range(50)), 0),  # every predecessor done
    ({10, 30}, 20),  # a layer starting at block 20: block 10 belongs to the layer before
    (set(), 20),
])
def test_lookback_sums_the_layer_predecessors(inclusive_at, first):
    gen = torch.Generator().manual_seed(5)
    counts = [tuple(int(x) for x in torch.randint(0, 2049, (3,), generator=gen))
              for _ in range(50)]
    desc = _descriptors(counts, inclusive_at, first)
    vid = 47
    out = torch.zeros(3, dtype=torch.int64)
    _lookback_probe[(1,)](desc, 50, vid, first, out, LB=16)
    # blocks of the layer before published prefixes of *their* layer: the look-back stops
    # at its layer's first block and never reads them
    assert out.tolist() == [sum(c[k] for c in counts[first:vid]) for k in range(3)]


def test_cuda_graphs_is_an_explicit_scoped_choice():
    assert graphs_mod.enabled() is False
    with cuda_graphs():
        assert graphs_mod.enabled() is True
        with cuda_graphs(False):
            assert graphs_mod.enabled() is False
        assert graphs_mod.enabled() is True
    assert graphs_mod.enabled() is False


@pytest.mark.skipif(not INTERPRET, reason="runs the kernels on CPU tensors")
def test_cuda_graphs_on_cpu_tensors_runs_eagerly():
    g = _randn(5000, 1).float()
    info = CallInfo()
    with cuda_graphs():
        got = T.select_triton(g, info=info)
    assert not info.replayed
    assert_same(got, reference.select(g))


def test_the_backend_reads_no_environment_variable():
    # (compile_check is a command-line tool beside the backend: it refuses to run under
    # TRITON_INTERPRET, which compiles nothing)
    for path in sorted(p for p in BACKEND.glob("*.py") if p.name != "compile_check.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
                pytest.fail(f"{path.name}:{node.lineno} reads the environment ({node.attr}); "
                            "settings belong in Tuning, passed explicitly")


def _backend_aliases(tree):
    """Names a test module binds to modules (or objects) of the Triton backend."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "dgp_kernels.kernels.triton"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names
                      if a.name.startswith("dgp_kernels.kernels.triton")}
    return names


def test_no_test_forces_a_path_through_module_state():
    """Tests pass a Tuning: a ``setattr`` / ``monkeypatch.setattr`` on anything of the
    backend (or a string target inside it) is refused."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = _backend_aliases(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))):
                continue
            fname = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if fname not in ("setattr", "setitem", "delattr") or not node.args:
                continue
            target = node.args[0]
            root = target
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(target, ast.Constant) and str(target.value).startswith(
                    "dgp_kernels.kernels.triton"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"tests that patch the Triton backend's module state: {offenders}"
