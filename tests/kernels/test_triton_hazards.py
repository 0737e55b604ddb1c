"""Hazards of the Triton backend that only layers near or above 2^31 elements reach.

The data passes index a layer in int32 (block starts and sizes in int32), so the launcher must refuse a
layer it cannot index (before, a 2^31-element layer ran with wrapped offsets, and the last
block of a 2^31 - 1 one, taken for a full block by a wrapped ``start + BLOCK <= n``, wrote
one entry past the layer), and the blocks of the largest layer it accepts must stay inside
it. Neither can be run end to end on a CPU (a 2^31-element layer is 8 GiB of float32 and
hours in the interpreter), so:

* the refusal is checked on ``meta`` tensors (the layer sizes, not the data, decide it,
  before any plan or launch);
* the blocks are checked on the write kernel alone, with the segment table pointing a block
  of the largest accepted layer at a small buffer whose entries past the block's share of
  the layer must stay untouched (the interpreter wraps int32 sums as the GPU does).
"""

import os

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton): the Triton kernels cannot run"
)

from dgp_kernels.kernels.triton import ops as T  # noqa: E402
from dgp_kernels.kernels.triton.common import MAX_LAYER  # noqa: E402
from dgp_kernels.kernels.triton.launch import check_layers  # noqa: E402
from dgp_kernels.kernels.triton.tuning import DEFAULT  # noqa: E402
from dgp_kernels.kernels.triton.write import write_kernel  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _meta(ns):
    return [torch.empty(n, dtype=torch.float16, device="meta") for n in ns]


@pytest.mark.parametrize("ns", [(2**31,), (1000, 2**31 + 5)], ids=["one-layer", "second-layer"])
def test_layers_of_2_31_elements_are_refused_before_any_launch(ns):
    # int32 offsets: block starts and the layer size wrap negative, the masks go wrong, and
    # the unmasked loads/stores address memory before the tensor. A clear error is the
    # contract; silent garbage (uninitialised outputs, foreign memory written) is not. The
    # refusal comes before the plan (meta tensors: no memory, no data, nothing launched).
    with pytest.raises(ValueError, match=r"tensor %d of the call has" % (len(ns) - 1)):
        T.select_multi_triton(_meta(ns))


def test_select_refuses_a_2_31_element_tensor():
    with pytest.raises(ValueError, match="at most"):
        T.select_triton(_meta([2**31])[0])


def test_the_limit_is_just_under_2_31():
    check_layers([MAX_LAYER])  # accepted
    with pytest.raises(ValueError):
        check_layers([MAX_LAYER + 1])
    assert MAX_LAYER + 2 * 2048 < 2**31  # a block (or tile) end past the layer's stays int32


@pytest.mark.skipif(not INTERPRET, reason="points the kernel at CPU buffers through the "
                    "interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)")
@pytest.mark.parametrize("dense", [False, True], ids=["residual", "dense"])
@pytest.mark.parametrize("full", [False, True], ids=["last-block", "full-block"])
def test_blocks_of_the_largest_layer_write_only_inside_it(dense, full):
    """The largest layer the launcher accepts (``MAX_LAYER - 1`` entries, not a multiple of
    BLOCK): its last (partial) block writes nothing past the layer's end, and a full block
    just before it writes exactly its own entries (int32 offsets near 2^31; the interpreter
    wraps int32 sums as the GPU does). The segment table points the block at a small
    buffer: entry ``start + j`` of the layer is buffer entry ``j``."""
    n = MAX_LAYER - 1
    B = DEFAULT.block
    last = (n - 1) // B * B
    assert last + B > n  # the layer's last block is partial
    start = last - B if full else last
    inside = min(n - start, B)  # entries of the block inside the layer
    g = torch.ones(B + 8, dtype=torch.float32)
    e = torch.full((B + 8,), 5.0)
    out = torch.full((B + 8,), 7.0)
    i64 = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    g_ptr = i64([g.data_ptr() - start * g.element_size()])
    e_ptr = i64([e.data_ptr() - start * e.element_size()])
    d_ptr = i64([out.data_ptr() - start * out.element_size()])
    write_kernel[(1,)](
        g_ptr, e_ptr, d_ptr, i64([0, 0]), i64([n]), i64([0]), i64([start]), i64([0]),
        i64([0]),  # the layer's band is empty: nothing kept, no ties
        i64([0] * 5), i64([0, 0]), torch.zeros(3, dtype=torch.int64), i64([0]), i64([0]), 1, 1,
        DT=triton.language.float32, KIND=0, HAS_E=not dense, ALIGNED=False,
        WRITE_SPARSE=False, WRITE_E=not dense, WRITE_DENSE=dense, BLOCK_=B, LB=16,
        num_warps=DEFAULT.num_warps,
    )
    target, written, untouched = (out, 0.0, 7.0) if dense else (e, 6.0, 5.0)
    assert bool((target[:inside] == written).all()), "the layer's own entries were not written"
    assert target[inside:].tolist() == [untouched] * (B + 8 - inside), (
        "the write pass stored past the end of its block or layer near 2^31 entries")
