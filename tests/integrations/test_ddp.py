"""DDP communication hook: real gloo process groups on 127.0.0.1 (spawned ranks), plus the
hook's state logic in-process.

Spawning is slow on this machine (each rank imports torch: ~4 s), so one 3-rank run
checks training with both the DGP hook and the ADGP hook, and one spawn of two 2-rank
groups checks that a crashed and a hung peer make the survivor fail within the timeout.
"""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from dgp_kernels.compressor import DGPCompressor, get_compressor
from dgp_kernels.integrations import ddp
from dgp_kernels.integrations.ddp import DGPHookState, StepStats, _pack_bits, _unpack_bits

from . import _ddp_worker as w

WORLD = 3
JOIN_TIMEOUT_S = 150.0


def _run(target, world, args, timeout_s):
    """Start ``world`` spawned ranks, wait at most ``timeout_s``, kill any leftover."""
    ctx = mp.get_context("spawn")
    port = w.free_port()
    procs = [ctx.Process(target=target, args=(r, world, port) + args, daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # bounded: never leave a rank behind
            if p.is_alive():
                p.kill()
                p.join(5)
    return [p.exitcode for p in procs]


def _run_ok(target, world, out, timeout_s):
    """``_run`` with ``(out,)``; every rank must exit 0; each rank's ``rank<r>.pt``."""
    codes = _run(target, world, (out,), timeout_s)
    assert codes == [0] * world, f"ranks exited with {codes}:\n{_errors(out)}"
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _errors(out_dir):
    return "\n".join(open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    return _run_ok(w.train_worker, WORLD, out, JOIN_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dgp", "adgp"])
def test_ranks_stay_in_sync_and_learn(trained, mode):
    ref = trained[0][mode]
    assert ref["params"].shape[0] == w.STEPS
    for r in range(1, WORLD):
        # bitwise identical replicas after every step
        assert torch.equal(trained[r][mode]["params"], ref["params"]), f"rank {r} diverged"
    first = sum(t[mode]["losses"][0] for t in trained) / WORLD
    last = sum(t[mode]["losses"][-1] for t in trained) / WORLD
    assert last < 0.95 * first, f"loss did not decrease: {first:.4f} -> {last:.4f}"


@pytest.mark.slow
def test_dgp_hook_matches_single_process_simulation_bitwise(trained):
    # Same per-rank data, one DGP compressor with error feedback per rank, payloads summed
    # in rank order in float32 and divided by the world size: the hook must give exactly
    # this (per-parameter bands and residuals do not depend on DDP's bucketing).
    sim = w.simulate(WORLD, "dgp", {"top": 0.05, "keep": 0.2})
    assert torch.equal(sim["params"], trained[0]["dgp"]["params"])


@pytest.mark.slow
def test_adgp_hook_matches_simulation_to_rounding(trained):
    # ADGP sums values with gloo's all-reduce, whose addition order over ranks is its own
    # (ring/halving), not rank order: float32 sums then differ in the last bits. 8 SGD
    # steps of lr 0.5 on O(1) weights keep the drift at a few ulps.
    sim = w.simulate(WORLD, "adgp", {"top": 0.05, "keep": 0.2})
    torch.testing.assert_close(trained[0]["adgp"]["params"], sim["params"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_bucket_rebuild_is_seen_and_bytes_are_recorded(trained):
    res = trained[0]["dgp"]
    names = res["names"]
    lay0, lay1 = res["layouts"][0], res["layouts"][1]
    # DDP rebuilt its buckets after the first step: other grouping, same parameters.
    assert lay0 != lay1
    params0 = sorted(names[tuple(k)] for key in lay0.values() for k in key)
    params1 = sorted(names[tuple(k)] for key in lay1.values() for k in key)
    assert params0 == params1 == sorted(set(names.values()))
    steps = res["steps"]
    assert len(steps) == w.STEPS
    assert steps[0]["numel"] == w.flat_params(w.make_model()).numel()
    for s in steps:
        assert s["dense_bytes"] == 4 * s["numel"]
        # DGP at keep 20%: values (4 B) of 20% plus index streams and headers, well under dense
        assert 0.2 * s["dense_bytes"] < s["payload_bytes"] < 0.5 * s["dense_bytes"]
        assert s["collective_bytes"] >= s["payload_bytes"] + 8
    # ADGP all-reduces only the values at the broadcast positions: band size x 4 bytes
    k = sum(int(0.2 * n + 1e-6) for n in (p.numel() for p in w.make_model().parameters()))
    for r in range(WORLD):
        for s in trained[r]["adgp"]["steps"]:
            assert s["payload_bytes"] == 4 * k
            extra = s["collective_bytes"] - s["payload_bytes"]
            if r == 0:  # the broadcaster also sends one position bitmap per bucket
                assert (s["numel"] + 7) // 8 <= extra < (s["numel"] + 7) // 8 + s["buckets"]
            else:
                assert extra == 0


@pytest.mark.slow
def test_dead_or_hung_rank_makes_the_survivor_fail_within_the_timeout(tmp_path):
    out = str(tmp_path)
    pg_timeout = 6.0
    ctx = mp.get_context("spawn")
    ports = [w.free_port(), w.free_port()]
    procs = [ctx.Process(target=w.failure_worker, args=(i, ports, out, pg_timeout), daemon=True) for i in range(4)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120.0
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    codes = [p.exitcode for p in procs]
    assert codes == [5, 3, 5, 4], f"exit codes {codes} (want survivor 5, crashed 3, survivor 5, hung 4):\n{_errors(out)}"
    crash_s, crash_msg = open(os.path.join(out, "group0.fail")).read().split("\n", 1)
    hang_s, hang_msg = open(os.path.join(out, "group1.fail")).read().split("\n", 1)
    for msg in (crash_msg, hang_msg):
        assert "dgp_hook" in msg and "on rank 0" in msg, msg
    # a crashed peer closes its sockets: gloo notices at once, well before the timeout
    assert float(crash_s) < pg_timeout
    # a hung peer is only noticed by the process group timeout
    assert pg_timeout - 1.0 <= float(hang_s) <= pg_timeout + 10.0, hang_s
    assert "Timed out" in hang_msg or "timeout" in hang_msg.lower(), hang_msg


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or TRITON_INTERPRET=1 for the Triton codec")
def test_device_codec_path_with_gloo_matches_the_host_path_bitwise(tmp_path):
    pytest.importorskip("triton")
    world = 2
    out = str(tmp_path)
    res = _run_ok(w.device_codec_worker, world, out, 400.0)
    sim = w.simulate(world, "dgp", {"top": 0.05, "keep": 0.2}, steps=w.DEVICE_STEPS)
    for r in range(world):
        # encode, all-gathers and decode-accumulate with the Triton codec: bitwise the
        # host codec's result (the simulation replays the host path in one process)
        assert torch.equal(res[r]["dgp"]["params"], sim["params"]), f"rank {r}"
        assert max(s["buckets"] for s in res[r]["dgp"]["steps"]) >= 2  # several buckets per step (after the rebuild)
        assert torch.equal(res[r]["adgp"]["params"], res[0]["adgp"]["params"])
    sim_a = w.simulate(world, "adgp", {"top": 0.05, "keep": 0.2}, steps=w.DEVICE_STEPS)
    torch.testing.assert_close(res[0]["adgp"]["params"], sim_a["params"], rtol=0, atol=1e-6)


def test_state_check_raises_on_a_device_flag():
    state = DGPHookState(codec="triton")
    state._pending.append((3, 1, torch.tensor(1, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="step 3, bucket 1: a rank's payload was rejected"):
        state.check()
    state.check()  # cleared
    state._pending.append((0, 0, torch.tensor(8, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="invalid indices"):
        state.check()
    with pytest.raises(ValueError, match="codec must be"):
        DGPHookState(codec="gpu")


# --------------------------------------------------------------------------------------
# In-process checks of the state (no process group needed).
# --------------------------------------------------------------------------------------
def test_residuals_follow_parameters_across_bucket_layouts():
    state = DGPHookState(compressor="dgp", params={"top": 0.1, "keep": 0.3})
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, generator=g) for n in (50, 30, 20))
    ka, kb, kc = (1, 50), (2, 30), (3, 20)
    # step 1: one bucket (a, b, c); step 2 on: buckets (c, b) and (a)
    ref = DGPCompressor(top=0.1, keep=0.3)
    state.compressor_for((ka, kb, kc), [a, b, c]).compress([a, b, c])
    ref.compress([a, b, c])
    for _ in range(3):
        state.compressor_for((kc, kb), [c, b]).compress([c, b])
        state.compressor_for((ka,), [a]).compress([a])
        ref.compress([a, b, c])
    want = ref.memory.peek()
    for key, e in zip((ka, kb, kc), want):
        assert torch.equal(state.residual(key), e)
    assert len(state._compressors) == 2 and not state._orphans


def test_top_feedback_param_reaches_the_compressor():
    state = DGPHookState(compressor="dgp", params={"top_feedback": "clipped"})
    g = torch.randn(200, generator=torch.Generator().manual_seed(0))
    comp = state.compressor_for(((1, 200),), [g])
    assert comp.top_feedback == "clipped"
    comp.compress([g])
    assert comp.dropped_entries > 0
    with pytest.raises(ValueError, match="top_feedback"):
        DGPHookState(compressor="dgp", params={"top_feedback": "half"})


def test_bitmap_pack_roundtrip():
    g = torch.Generator().manual_seed(1)
    for n in (0, 1, 7, 8, 9, 100, 1001):
        m = torch.rand(n, generator=g) < 0.3
        packed = _pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(_unpack_bits(packed, n), m)


def test_step_stats_ratio():
    s = StepStats(step=0, buckets=2, numel=100, payload_bytes=90, collective_bytes=100, dense_bytes=400)
    assert s.ratio == pytest.approx(0.225)
    assert StepStats(0, 0, 0, 0, 0, 0).ratio == 0.0


def test_state_rejects_bad_arguments():
    with pytest.raises(ValueError, match="compressor must be one of"):
        DGPHookState(compressor="nope")
    with pytest.raises(TypeError, match="compressor"):
        DGPHookState(compressor=3)
    with pytest.raises(TypeError, match="has no parameter 'bogus'"):
        DGPHookState(compressor="dgp", params={"bogus": 1})
    with pytest.raises(ValueError, match="top"):
        DGPHookState(compressor="adgp", params={"top": 1.5})
    with pytest.raises(ValueError, match="value_dtype"):
        DGPHookState(value_dtype="int8")
    with pytest.raises(TypeError, match="params"):
        DGPHookState(params=[1])
    with pytest.raises(ValueError, match="only for a compressor given by name"):
        DGPHookState(compressor=lambda: get_compressor("dgp"), params={"top": 0.1})
    with pytest.raises(TypeError, match="process_group"):
        DGPHookState(process_group="world")
    bad = DGPHookState(compressor=lambda: "not a compressor")
    with pytest.raises(TypeError, match="not a Compressor"):
        bad.compressor_for(((1, 4),), [torch.zeros(4)])
    with pytest.raises(TypeError, match="DGPHookState"):
        ddp.dgp_hook(object(), None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="this torch has no NCCL")
def test_nccl_on_cuda(tmp_path):
    world = min(2, torch.cuda.device_count())  # NCCL needs one GPU per rank
    out = str(tmp_path)
    codes = _run(w.nccl_worker, world, (out,), 120.0)
    assert codes == [0] * world, f"ranks exited with {codes}:\n{_errors(out)}"
    res = torch.load(os.path.join(out, "rank0.pt"), weights_only=False)
    for mode in ("dgp", "adgp"):
        assert res[mode]["grad_device"].startswith("cuda")
        assert all(torch.isfinite(torch.tensor(res[mode]["losses"])))
        assert all(s["payload_bytes"] < s["dense_bytes"] for s in res[mode]["steps"])


def test_state_dict_moves_residuals_by_parameter_name():
    model = w.make_model()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.numel(), generator=g) for p in params]
    keys = [ddp._param_key(p) for p in params]
    state = DGPHookState()
    state.compressor_for(tuple(keys), grads).compress(grads)  # one bucket with everything
    sd = state.state_dict(model)
    assert sorted(sd["residuals"]) == sorted(n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        assert sd["residuals"][n].shape == p.shape
    # a restarted job: a new model object (other storage), residuals restored by name
    model2 = w.make_model()
    params2 = list(model2.parameters())
    keys2 = [ddp._param_key(p) for p in params2]
    state2 = DGPHookState()
    state2.load_state_dict(torch.load(_roundtrip(sd), weights_only=True), model2)
    # any bucket layout picks its parameters' residuals up
    state2.compressor_for((keys2[2], keys2[0]), [grads[2], grads[0]])
    state2.compressor_for(tuple(keys2[i] for i in (1, 3, 4, 5)), [grads[i] for i in (1, 3, 4, 5)])
    for (n, _), k in zip(model2.named_parameters(), keys2):
        assert torch.equal(state2.residual(k), sd["residuals"][n].reshape(-1))
    with pytest.raises(ValueError, match="not a parameter"):
        state2.load_state_dict({"version": 1, "residuals": {"nope": torch.zeros(1)}}, model2)
    with pytest.raises(ValueError, match="shape"):
        state2.load_state_dict({"version": 1, "residuals": {"out.bias": torch.zeros(7)}}, model2)
    with pytest.raises(ValueError, match="state_dict"):
        state2.load_state_dict({"residuals": {}}, model2)
    with pytest.raises(TypeError, match="module"):
        state2.state_dict("model")


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
