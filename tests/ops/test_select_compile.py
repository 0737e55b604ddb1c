"""``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` for every dgp op.

opcheck checks the schema (declared mutation matches what the kernel does), the autograd
registration, the fake kernel against the real one (shapes, dtypes, strides) and AOT
dispatch with dynamic shapes. The compile tests trace a small function around each op and
around each public wrapper and require bitwise the eager results. Most use the
``aot_eager`` backend (functionalization + fake kernels, no codegen); ``select_ef`` is also
compiled once with inductor (~20 s cold on the 2-core CI box).
"""

from __future__ import annotations

import pytest
import torch

import dgp_kernels

from .test_select import assert_tree_same, clone_keep_layout, make_values


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _g(n=300, dtype=torch.float32, seed=0, kind="band_tie"):
    return make_values(kind, n, dtype, seed=seed)


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------
def _single_samples():
    f32 = _g(300).reshape(15, 20)
    return [
        (f32, 0.05, 0.2),
        (f32.t(), 0.1, 0.3),  # non-contiguous
        (_g(257, torch.bfloat16, 1), 0.0, 1.0),
        (_g(64, torch.float16, 2, "zeros90"), 0.3, 0.7),
        (_g(33, torch.float64, 3), 0.05, 0.2),
        (torch.empty(0), 0.05, 0.2),
    ]


@pytest.mark.parametrize("op", ["select", "prune", "prune_"])
def test_opcheck_single(op):
    for g, top, keep in _single_samples():
        if op == "prune_":
            g = clone_keep_layout(g)  # each opcheck call gets its own copy to mutate
        torch.library.opcheck(getattr(torch.ops.dgp, op), (g, top, keep))


def test_opcheck_select_ef():
    for g, top, keep in _single_samples():
        e = clone_keep_layout(make_values("randn", g.numel(), g.dtype, seed=5).reshape(g.shape))
        torch.library.opcheck(torch.ops.dgp.select_ef, (g, e, top, keep))
    g = _g(200).reshape(10, 20)
    e = make_values("randn", 400, torch.float32, seed=6).reshape(10, 40)[:, ::2]  # strided residual
    torch.library.opcheck(torch.ops.dgp.select_ef, (g, e, 0.05, 0.2))


def _list_samples():
    return [
        [_g(300).reshape(3, 100), _g(1, seed=1), torch.empty(0), _g(64, seed=2).reshape(8, 8).t()],
        [_g(50, torch.bfloat16, 3), _g(40, torch.bfloat16, 4)],
        [_g(1, torch.float64, 5)],
        [torch.empty(0), torch.empty(2, 0)],
    ]


def test_opcheck_select_multi():
    for gs in _list_samples():
        torch.library.opcheck(torch.ops.dgp.select_multi, (gs, 0.05, 0.2))


def test_opcheck_select_ef_multi():
    for gs in _list_samples():
        rs = [make_values("randn", g.numel(), g.dtype, seed=i).reshape(g.shape) for i, g in enumerate(gs)]
        torch.library.opcheck(torch.ops.dgp.select_ef_multi, (gs, rs, 0.05, 0.2))


def test_opcheck_select_multi_dynamic():
    gs = [_g(100), _g(12, seed=1).reshape(3, 4)]
    torch.library.opcheck(torch.ops.dgp.select_multi, (gs, 0.05, 0.2), test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("op", ["select_multi", "select_ef_multi"])
def test_opcheck_empty_list(op):
    args = ([], 0.05, 0.2) if op == "select_multi" else ([], [], 0.05, 0.2)
    torch.library.opcheck(getattr(torch.ops.dgp, op), args)


# --------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------
def _compare_compiled(fn, make_args, backend="aot_eager", dynamic=False):
    """Compile ``fn`` and compare with eager on fresh copies of the arguments, including the
    arguments ``fn`` mutates."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    args_c, args_e = make_args(), make_args()
    out_c = compiled(*args_c)
    out_e = fn(*args_e)
    assert_tree_same(out_c, out_e, "compiled output")
    assert_tree_same(list(args_c), list(args_e), "compiled mutated arguments")
    return compiled


def _ops_fn_select(g):
    i, v = torch.ops.dgp.select(g, 0.05, 0.2)
    return i + 1, v * 2


def _ops_fn_prune(g):
    return torch.ops.dgp.prune(g * 1, 0.1, 0.3) + 0


def _ops_fn_prune_(g):
    h = g * 1
    torch.ops.dgp.prune_(h, 0.05, 0.2)
    torch.ops.dgp.prune_(g, 0.0, 0.5)  # mutates the graph input
    return h


def _ops_fn_select_ef(g, e):
    i, v = torch.ops.dgp.select_ef(g, e, 0.05, 0.2)
    return i, v, e * 2  # elementwise (a sum would reorder under inductor)


def _ops_fn_select_multi(a, b, c):
    return torch.ops.dgp.select_multi([a, b, c], 0.05, 0.2)


def _ops_fn_select_ef_multi(a, b, ea, eb):
    return torch.ops.dgp.select_ef_multi([a, b], [ea, eb], 0.05, 0.2)


def _args_single():
    return (_g(400).reshape(20, 20),)


def _args_ef():
    return (_g(400).reshape(20, 20), make_values("randn", 400, torch.float32, seed=9).reshape(20, 20))


def _args_multi():
    return (_g(400).reshape(20, 20), _g(37, seed=1), torch.empty(0))


def _args_ef_multi():
    return (_g(400), _g(37, seed=1), make_values("randn", 400, torch.float32, seed=2),
            make_values("randn", 37, torch.float32, seed=3))


@pytest.mark.parametrize(
    "fn,make_args",
    [
        (_ops_fn_select, _args_single),
        (_ops_fn_prune, _args_single),
        (_ops_fn_prune_, _args_single),
        (_ops_fn_select_ef, _args_ef),
        (_ops_fn_select_multi, _args_multi),
        (_ops_fn_select_ef_multi, _args_ef_multi),
    ],
    ids=["select", "prune", "prune_", "select_ef", "select_multi", "select_ef_multi"],
)
def test_compile_ops_aot_eager(fn, make_args):
    _compare_compiled(fn, make_args)


def test_compile_select_ef_inductor():
    _compare_compiled(_ops_fn_select_ef, _args_ef, backend="inductor")


def _wrappers_fn(g, e, a, b, ea, eb):
    i, v = dgp_kernels.select(g)
    d = dgp_kernels.prune(g, 0.1, 0.3)
    h = g * 1
    dgp_kernels.prune_(h)
    ie, ve = dgp_kernels.select_ef(g, e, top=0.0, keep=0.5)
    mi, mv, mo = dgp_kernels.select_multi([a, b])
    ei, ev, eo = dgp_kernels.select_ef_multi([a, b], [ea, eb])
    return i, v, d, h, ie, ve, mi, mv, mo, ei, ev, eo


def _args_wrappers():
    return _args_ef() + _args_ef_multi()


def test_compile_wrappers_aot_eager():
    _compare_compiled(_wrappers_fn, _args_wrappers)


def test_compile_dynamic_shapes_select():
    """Dynamic numel: the fake kernel exposes k_keep as an unbacked size."""
    compiled = torch.compile(_ops_fn_select, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (100, 201, 333, 1000):
        g = _g(n, seed=n)
        assert_tree_same(compiled(g), _ops_fn_select(g), f"dynamic n={n}")


@pytest.mark.parametrize("op", ["select", "select_ef", "prune", "prune_", "select_multi",
                                "select_ef_multi"])
def test_ops_are_tagged_cudagraph_unsafe(op):
    """On CUDA each op reads a few flags back to the host once per call, which a CUDA graph
    capture cannot hold: the schema says so, so that torch.compile's cudagraph modes leave
    the ops out of their graphs instead of failing inside a capture."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip(f"torch {torch.__version__} has no cudagraph_unsafe tag")
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.dgp, op).default.tags
