"""``opcheck`` and ``torch.compile(fullgraph=True)`` on CUDA tensors (the Triton kernels
registered for the CUDA key). Skipped without a GPU: on CPU tensors the same checks run
against the C++ kernels in ``tests/ops/test_select_compile.py``."""

from __future__ import annotations

import pytest
import torch

import dgp_kernels  # noqa: F401  (registers the ops)

from ..ops.test_select import assert_tree_same, make_values

pytestmark = pytest.mark.cuda  # (the CUDA dispatch key is only hit with a CUDA device)


def _g(n, dtype=torch.float32, seed=0, kind="band_tie"):
    return make_values(kind, n, dtype, seed=seed).cuda()


def _samples():
    return [
        (_g(300).reshape(15, 20), 0.05, 0.2),
        (_g(300).reshape(15, 20).t(), 0.1, 0.3),  # non-contiguous
        (_g(257, torch.bfloat16, 1), 0.0, 1.0),
        (_g(64, torch.float16, 2, "zeros90"), 0.3, 0.7),
        (_g(33, torch.float64, 3), 0.05, 0.2),
        (torch.empty(0, device="cuda"), 0.05, 0.2),
        (_g(1 << 21, seed=4), 0.05, 0.2),  # the sampled path
    ]


@pytest.mark.parametrize("op", ["select", "prune", "prune_"])
def test_opcheck_cuda(op):
    for g, top, keep in _samples():
        if op == "prune_":
            g = g.clone()
        torch.library.opcheck(getattr(torch.ops.dgp, op), (g, top, keep))


def test_opcheck_select_ef_cuda():
    for g, top, keep in _samples():
        e = make_values("randn", g.numel(), g.dtype, seed=5).reshape(g.shape).cuda()
        torch.library.opcheck(torch.ops.dgp.select_ef, (g, e, top, keep))


def test_opcheck_multi_cuda():
    gs = [_g(300).reshape(3, 100), _g(1, seed=1), torch.empty(0, device="cuda"), _g(5000, seed=2)]
    rs = [make_values("randn", g.numel(), g.dtype, seed=i).reshape(g.shape).cuda()
          for i, g in enumerate(gs)]
    torch.library.opcheck(torch.ops.dgp.select_multi, (gs, 0.05, 0.2))
    torch.library.opcheck(torch.ops.dgp.select_ef_multi, (gs, rs, 0.05, 0.2))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_select_ef_cuda(backend):
    """A compiled training-step fragment around select_ef on CUDA gives eager's bits."""
    torch._dynamo.reset()

    def fn(g, e):
        i, v = torch.ops.dgp.select_ef(g * 1, e, 0.05, 0.2)
        return i, v * 2, e * 2

    def make():
        return _g(1 << 16, seed=7), make_values("randn", 1 << 16, torch.float32, seed=8).cuda()

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    a, b = make(), make()
    assert_tree_same(compiled(*a), fn(*b), "compiled output")
    assert_tree_same(list(a), list(b), "compiled mutated residual")
    torch._dynamo.reset()
