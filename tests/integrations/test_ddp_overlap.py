"""The DDP hook overlaps its exchange with the backward pass: real gloo ranks on
127.0.0.1, no mocks. Rank 1 starts its backward pass late, so no collective of that step
can finish before it does; rank 0's hook calls must all return long before that (no hook
call waits on the link), i.e. every bucket is compressed and its collective started while
the earlier buckets' collectives are still waiting."""

import os

import pytest
import torch

from . import _ddp_worker as w
from .test_ddp import _errors, _run

JOIN_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def overlap(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("overlap"))
    codes = _run(w.overlap_worker, 2, (out,), JOIN_TIMEOUT_S)
    assert codes == [0, 0], f"ranks exited with {codes}:\n{_errors(out)}"
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dgp", "adgp"])
def test_hook_returns_before_the_collective_completes(overlap, mode):
    ev = overlap[0][mode]["events"]
    delay = w.OVERLAP_DELAY_S
    assert len(ev) >= 3, f"expected a bucket per layer, got {len(ev)} buckets"
    assert sorted(e["index"] for e in ev) == list(range(len(ev)))
    first_done = min(e["done"] for e in ev)
    # the collectives really waited for the late peer: the test observes something
    assert first_done > 0.6 * delay, f"a bucket completed at {first_done:.3f} s, before the peer started"
    for e in ev:
        # no hook call waited for the link ...
        assert e["returned"] - e["call"] < delay / 4, f"bucket {e['index']}: hook call took {e['returned'] - e['call']:.3f} s"
    # ... so every bucket's compression ran (and its collective was started) while the
    # first bucket's collective was still waiting: nothing serialised behind it
    assert max(e["returned"] for e in ev) < first_done - delay / 4
    # backward itself waits for the futures (DDP), i.e. for the late peer
    assert overlap[0][mode]["backward_s"] > 0.6 * delay


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dgp", "adgp"])
def test_overlapped_replicas_stay_bitwise_equal(overlap, mode):
    assert torch.equal(overlap[0][mode]["params"], overlap[1][mode]["params"])
