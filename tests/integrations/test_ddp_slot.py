"""The sparse exchange's fixed slot width (in-process, no process group): every payload a
fixed-k compressor produces fits the width computed from its first payload, whatever the
positions, so ranks agree on the all-gather's size without exchanging it."""

import pytest
import torch

from dgp_kernels.codec import encode
from dgp_kernels.compressor import get_compressor
from dgp_kernels.integrations.ddp import DGPHookState, _slot_width

SHAPES = [(1,), (3,), (9,), (64, 3), (1000,), (257, 129)]


def _grads(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shp in SHAPES:
        n = int(torch.tensor(shp).prod())
        if kind == "random":
            v = torch.randn(n, generator=g)
        elif kind == "even":  # the largest entries evenly spaced: long gap codes
            v = torch.randn(n, generator=g) * 1e-3
            v[:: max(1, n // 50)] = 10.0
        else:  # clustered at the end: short gaps, one long one
            v = torch.randn(n, generator=g) * 1e-3
            v[-max(1, n // 5):] = 10.0
        out.append(v)
    return out


@pytest.mark.parametrize("name", ["dgp", "topk", "randk"])
@pytest.mark.parametrize("value_dtype", [None, "bfloat16"])
def test_every_payload_fits_the_slot(name, value_dtype):
    params = {"seed": 1} if name == "randk" else {}
    state = DGPHookState(compressor=name, params=params, value_dtype=value_dtype)
    comp = get_compressor(name, **params)
    key = tuple((i, int(torch.tensor(s).prod())) for i, s in enumerate(SHAPES))
    width = None
    for seed in range(4):
        for kind in ("random", "even", "clustered"):
            payload = comp.compress(_grads(kind, seed))
            w = _slot_width(state, key, payload)
            width = w if width is None else width
            assert w == width  # cached: the same for every payload of the layout
            assert len(encode(payload, value_dtype)) <= w - 8


def test_a_changed_value_count_is_an_error():
    state = DGPHookState(compressor="topk", params={"keep": 0.1})
    key = ((0, 1000),)
    _slot_width(state, key, get_compressor("topk", keep=0.1).compress([torch.randn(1000)]))
    with pytest.raises(RuntimeError, match="counts must follow from the shapes"):
        _slot_width(state, key, get_compressor("topk", keep=0.2).compress([torch.randn(1000)]))


def test_the_aligned_worker_thread_ends_with_its_state():
    import gc
    import threading

    from dgp_kernels.integrations.ddp import _BucketWorker

    before = sum(t.name == "dgp_hook-aligned" for t in threading.enumerate())
    w = _BucketWorker()
    fut = w.submit(lambda f: f.set_result(torch.ones(2)))
    assert torch.equal(fut.wait(), torch.ones(2))
    bad = w.submit(lambda f: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.wait()
    thread = w._thread
    del w, fut, bad
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
    assert sum(t.name == "dgp_hook-aligned" for t in threading.enumerate()) == before
