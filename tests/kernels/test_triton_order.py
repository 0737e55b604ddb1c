"""The Triton kernels give the same bits whatever order a launch's programs run in.

Triton's interpreter runs the programs of a launch one after another in program-id order;
a GPU runs them concurrently, in an order nobody promises. A kernel that (silently) relies
on the interpreter's order (e.g. that the program with the highest id finishes a layer
last, or that block ``i`` has run before block ``i + 1`` reads its count) passes every
other interpreter test and is wrong on a GPU. Here the interpreter's grid loop runs the
programs in reverse and in shuffled orders, and every boundary path (fused tails and
look-back write pass included) must still match the reference bit for bit. What this cannot
show is the effect of *concurrent* programs (memory ordering between them): the GPU tests
cover that.
"""

import builtins
import inspect
import os
import random
import sys

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton): the Triton kernels cannot run"
)

import triton.language as tl  # noqa: E402

from dgp_kernels.ops import reference  # noqa: E402
from dgp_kernels.kernels.triton import ops as T  # noqa: E402
from dgp_kernels.kernels.triton.launch import CallInfo  # noqa: E402
from dgp_kernels.kernels.triton.tuning import Tuning  # noqa: E402

from .test_triton_select import (  # noqa: E402,F401  (forced_path is a fixture)
    _layers,
    _make,
    _residual_like,
    assert_same,
    FORCED,
    forced_path,
)

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("program order is only under our control in Triton's interpreter "
                "(TRITON_INTERPRET=1); on a GPU the hardware picks it",
                allow_module_level=True)

from triton.runtime import interpreter as _interp  # noqa: E402

_GRID_CALL = _interp.GridExecutor.__call__
if "for x in range(grid[0])" not in inspect.getsource(_GRID_CALL):
    pytest.skip(f"triton {triton.__version__}: the interpreter's grid loop is not the "
                "`for x in range(grid[0])` nest this test reorders", allow_module_level=True)


@pytest.fixture(params=["reversed", "shuffled"])
def program_order(request, monkeypatch):
    """Run every launch's programs in reverse order, or shuffled (each grid dimension's
    loop in a random order, seeded): the interpreter's grid loop looks up ``range`` in its
    module, so a module-level ``range`` that permutes only when called from that loop
    reorders the programs and nothing else."""
    rng = random.Random(1234)
    code = _GRID_CALL.__code__

    def ordered_range(*args):
        r = builtins.range(*args)
        if sys._getframe(1).f_code is not code:
            return r
        ids = list(r)
        if request.param == "reversed":
            ids.reverse()
        else:
            rng.shuffle(ids)
        return ids

    monkeypatch.setattr(_interp, "range", ordered_range, raising=False)
    return request.param


@triton.jit
def _arrival_kernel(counter, order):
    t = tl.atomic_add(counter, 1)
    tl.store(order + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), t)


def test_fixture_reorders_the_programs(program_order):
    """The patch takes effect: each program records when it ran."""
    counter = torch.zeros(1, dtype=torch.int32)
    order = torch.full((6 * 3,), -1, dtype=torch.int32)
    _arrival_kernel[(6, 3)](counter, order)
    assert sorted(order.tolist()) == list(range(18))  # each program ran once
    if program_order == "reversed":
        assert order.tolist() == list(range(17, -1, -1))
    else:
        assert order.tolist() != list(range(18))


@pytest.mark.parametrize("case", ["randn", "tie_band"])
def test_every_boundary_path_in_any_program_order(case, forced_path, program_order):
    """One layer and a list of layers (empty, tiny, non-contiguous, tie-heavy members, one
    of 40 blocks) with error feedback, on every boundary path, programs in reverse /
    shuffled order."""
    if case == "tie_band" and program_order == "shuffled":
        pytest.skip("one order is enough for the small tie case (CI time)")
    name, tuning = forced_path
    tuning = tuning.replace(block=512, lookback=16)  # many blocks per layer
    g, top, keep = _make(case, torch.float32, "cpu")
    e = _residual_like(g, 91)
    e_ref = e.clone()
    info = CallInfo()
    assert_same(T.select_ef_triton(g, e, top, keep, tuning=tuning, info=info),
                reference.select_ef(g, e_ref, top, keep))
    assert_same(e, e_ref)
    if name in ("sampled", "sampled_blocks") and case == "randn":
        # a wrong order would not change the bits (a layer whose checks fail is rerun on the
        # exact path), but it would make the sample look like a miss
        assert info.missed == [], "the sample of a tie-free layer should hold both boundaries"
    if case == "randn":
        gs = _layers(torch.float32, "cpu") + [_make("randn_2chunks", torch.float32, "cpu")[0][:20_000]]
        es = [_residual_like(x, 92 + i) for i, x in enumerate(gs)]
        es_ref = [x.clone() for x in es]
        assert_same(T.select_ef_multi_triton(gs, es, 0.05, 0.2, tuning=tuning),
                    reference.select_ef_multi(gs, es_ref, 0.05, 0.2))
        assert_same(es, es_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_other_dtypes_in_any_program_order(dtype, program_order):
    """The sampled path (the most order-sensitive launches: fused tails, look-back) for the
    other key widths."""
    gs = _layers(dtype, "cpu")
    es = [_residual_like(x, 93 + i) for i, x in enumerate(gs)]
    es_ref = [x.clone() for x in es]
    assert_same(T.select_ef_multi_triton(gs, es, 0.05, 0.2, tuning=FORCED["sampled"]),
                reference.select_ef_multi(gs, es_ref, 0.05, 0.2))
    assert_same(es, es_ref)
