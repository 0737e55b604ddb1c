"""The aligned (ADGP) hook's worker thread in a 4-rank gloo group with bfloat16 values,
several buckets and DDP's own buffer broadcasts on the main thread: real processes on
127.0.0.1, no mocks. Every rank issues the same collectives in the same order, all from the
one worker thread (never two threads racing on the process group, which is what breaks
torch's multi-bucket PowerSGD hook on gloo), the replicas stay bitwise equal, and no thread
spins while a collective waits for a late peer."""


import pytest
import torch

from . import _ddp_worker as w
from .test_ddp import _run_ok

WORLD = 4
JOIN_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("threads"))
    return _run_ok(w.threads_worker, WORLD, out, JOIN_TIMEOUT_S)


@pytest.mark.slow
def test_every_rank_issues_the_same_collectives_from_one_worker_thread(ran):
    logs = [r["log"] for r in ran]
    assert ran[0]["buckets"] >= 3, "the model should span several buckets"
    # one broadcast of positions and one all-reduce of values per bucket and step (DDP
    # rebuilds its buckets after the first step)
    assert len(logs[0]) == 2 * sum(1 for e in logs[0] if e[0] == "broadcast")
    assert len(logs[0]) >= 2 * ran[0]["buckets"] * (w.THREADS_STEPS - 1)
    for r in range(1, WORLD):
        assert [e[:3] for e in logs[r]] == [e[:3] for e in logs[0]], f"rank {r} issued other collectives"
    for r in range(WORLD):
        assert {e[3] for e in logs[r]} == {"dgp_hook-aligned"}
    assert {e[2] for e in logs[0] if e[0] == "all_reduce"} == {"torch.bfloat16"}


@pytest.mark.slow
def test_replicas_stay_bitwise_equal(ran):
    for r in range(1, WORLD):
        assert torch.equal(ran[r]["params"], ran[0]["params"])


@pytest.mark.slow
def test_the_hook_worker_sleeps_while_its_collective_waits(ran):
    window = 0.4 * w.THREADS_DELAY_S
    for r in range(WORLD - 1):  # the last rank is the late one
        wall, busy = ran[r]["backward_s"], ran[r]["worker_busy_s"]
        # the wait was real: this rank's backward pass waited for the late peer ...
        assert wall > 0.8 * w.THREADS_DELAY_S, f"rank {r}: backward took {wall:.3f} s"
        # ... and the hook's worker thread slept through the middle of it (a thread that
        # spins on a collective is running or queued for the whole window)
        assert busy < 0.25 * window, f"rank {r}: the worker ran or queued {busy:.3f} s of a {window:.3f} s wait"
