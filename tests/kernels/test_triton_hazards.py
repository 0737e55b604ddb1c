"""Hazards of the Triton backend that only layers near or above 2^31 elements reach.

The data passes index a layer in int32 (``_block_offsets``), so the launcher must refuse a
layer it cannot index, and the kernels' "is this block entirely inside its layer" test must
not wrap around near 2^31. Neither can be run end to end on a CPU (a 2^31-element layer is
8 GiB of float32 and hours in the interpreter), so:

* the refusal is checked on ``meta`` tensors with the launch replaced by a sentinel (the
  layer sizes, not the data, decide it);
* the block test is checked on the write kernel alone, with the segment table pointing the
  last block of a ``2^31 - 1``-element layer at a small buffer whose last entry lies just
  past the layer's end (the interpreter wraps int32 sums as the GPU does).
"""

import os
from collections import OrderedDict

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton): the Triton kernels cannot run"
)

from dgp_kernels.kernels.triton import select as ts  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _Launched(Exception):
    """Raised by the stand-in for ``_launch``: the launcher accepted the call."""


def _no_launch(*args, **kwargs):
    raise _Launched()


def _accepts(monkeypatch, ns, fn=ts.select_multi_triton) -> bool:
    """Whether the launcher would queue kernels for layers of sizes ``ns`` (meta tensors:
    no memory, no data; the launch itself is replaced by a sentinel). A refusal must be a
    ``ValueError``."""
    monkeypatch.setattr(ts, "_launch", _no_launch)
    monkeypatch.setattr(ts, "USE_CUDA_GRAPHS", False)
    monkeypatch.setattr(ts, "_PLANS", OrderedDict())  # (the big plans go with the patch)
    gs = [torch.empty(n, dtype=torch.float16, device="meta") for n in ns]
    try:
        fn(gs)
    except _Launched:
        return True
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("ns", [(2**31,), (1000, 2**31 + 5)], ids=["one-layer", "second-layer"])
def test_layers_of_2_31_elements_are_refused_before_any_launch(monkeypatch, ns):
    # int32 offsets: block starts and the layer size wrap negative, the masks go wrong, and
    # the unmasked loads/stores address memory before the tensor. A clear error is the
    # contract; silent garbage (uninitialised outputs, foreign memory written) is not.
    assert not _accepts(monkeypatch, ns), (
        f"layers of {ns} elements were launched; the kernels index layers in int32"
    )


def test_select_refuses_a_2_31_element_tensor(monkeypatch):
    assert not _accepts(monkeypatch, [2**31], fn=lambda gs: ts.select_triton(gs[0]))


@pytest.mark.skipif(not INTERPRET, reason="points the kernel at CPU buffers through the "
                    "interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)")
@pytest.mark.parametrize("dense", [False, True], ids=["residual", "dense"])
def test_last_block_of_a_2_31_minus_1_layer_writes_nothing_past_its_end(monkeypatch, dense):
    n = 2**31 - 1
    if not _accepts(monkeypatch, [n]):
        pytest.skip("the launcher refuses layers this large, so the kernel never sees one")
    monkeypatch.undo()
    B = ts.BLOCK
    start = (n - 1) // B * B  # the layer's last block
    past = n - start  # buffer index of entry n: one past the layer's end
    assert past < B  # the block is partial: its last lanes lie outside the layer
    g = torch.ones(B, dtype=torch.float32)
    e = torch.full((B,), 5.0)
    out = torch.full((B,), 7.0)
    i64 = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    # segment table entries such that entry `start + j` of the layer is buffer entry j
    g_ptr = i64([g.data_ptr() - start * g.element_size()])
    e_ptr = i64([e.data_ptr() - start * e.element_size()])
    d_ptr = i64([out.data_ptr() - start * out.element_size()])
    one = i64([0])
    ts._write_kernel[(1,)](
        g_ptr, e_ptr, d_ptr, i64([n]), one, i64([start]),
        i64([-1]), i64([2**63 - 1]), one, one, one,  # nothing kept (T_hi = -1), no ties
        one, one, one, one, one, i64([0, 0]), torch.zeros(3, dtype=torch.int32), 1,
        one, one, 0, one, 0,
        DT=ts.tl.float32, KIND=0, HAS_E=not dense, ALIGNED=False, WRITE_SPARSE=False,
        WRITE_E=not dense, WRITE_DENSE=dense, BLOCK_=B, PERSIST=False, STAGES=1,
        SUPER=ts.SUPER, num_warps=ts.NUM_WARPS,
    )
    target, inside, untouched = (out, 0.0, 7.0) if dense else (e, 6.0, 5.0)
    assert bool((target[:past] == inside).all()), "the layer's own entries were not written"
    assert target[past:].tolist() == [untouched] * (B - past), (
        "the write pass stored past the end of a layer of 2^31 - 1 elements "
        "(int32 `start + BLOCK_ <= n` wrapped, so the partial block was treated as full)"
    )
