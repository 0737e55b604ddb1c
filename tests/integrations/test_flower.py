"""Flower integration: a real federation in Flower's simulation engine (Ray actors on this
machine), plus the mod's and strategy's cores in-process."""

import importlib
import json
import os
import signal
import shutil
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr", reason='needs pip install "dgp_kernels[flower]"')

from flwr.app import RecordDict  # noqa: E402

from dgp_kernels.codec import LayerPayload, SparsePayload, decode, encode  # noqa: E402
from dgp_kernels.compressor import DGPCompressor, get_compressor  # noqa: E402
from dgp_kernels.integrations import flower as fl  # noqa: E402
from dgp_kernels.integrations.flower import (  # noqa: E402
    ClientUpload,
    DGPMod,
    aggregate_updates,
    encode_update,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _descendants(pid: int):
    """Pids of all live descendants of ``pid`` (from /proc; Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return [p for p in out if not _is_resource_tracker(p)]


def _is_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker: started by the first spawn, lives as long as we do."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


@pytest.mark.slow
def test_federation_learns_with_dgp_and_drops_a_corrupted_upload(tmp_path):
    pytest.importorskip("ray", reason='the simulation engine needs pip install "flwr[simulation]"')
    import multiprocessing

    from . import _flower_app as app

    result_file = tmp_path / "result.json"
    ray_tmp = tempfile.mkdtemp(prefix="dgpray")  # short path: Ray's socket names must fit 107 chars
    # Ray's actors import the app by name: put the repository on their path.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + ([saved] if saved else []))
    before = set(_descendants(os.getpid()))
    # In a child process, so a stuck Ray start-up cannot hang the test: bounded join, then
    # every process it left behind (Ray's GCS, raylet, actors) is killed.
    proc = multiprocessing.get_context("spawn").Process(
        target=app.run_federation, args=(str(result_file), ray_tmp), daemon=False)
    try:
        proc.start()
        proc.join(240)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        if proc.is_alive():  # collect its tree first: killed, Ray's daemons would be orphaned
            for pid in [proc.pid] + _descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.join(5)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and set(_descendants(os.getpid())) - before:
            time.sleep(0.2)
        for pid in set(_descendants(os.getpid())) - before:  # leftovers we started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.exitcode == 0, f"the federation process exited with {proc.exitcode}"

    res = json.loads(result_file.read_text())
    evals = {int(k): v for k, v in res["evals"].items()}
    assert sorted(evals) == list(range(app.ROUNDS + 1))
    assert evals[app.ROUNDS]["loss"] < 0.8 * evals[0]["loss"]
    assert evals[app.ROUNDS]["accuracy"] > evals[0]["accuracy"] + 0.2
    hist = res["history"]
    assert [h["round"] for h in hist] == list(range(1, app.ROUNDS + 1))
    numel = app.FEATURES * app.CLASSES + app.CLASSES
    for h in hist:
        assert h["dense_bytes"] == 4 * numel
        for b in h["upload_bytes"]:
            # DGP at keep 20 %: values are 20 % of dense, plus index streams and headers
            assert 0.2 * h["dense_bytes"] < b < 0.35 * h["dense_bytes"]
        if h["round"] == app.CORRUPT_ROUND:
            assert len(h["accepted"]) == app.NUM_CLIENTS - 1
            assert len(h["rejected"]) == 1 and "checksum" in h["rejected"][0][1]
        else:
            assert len(h["accepted"]) == app.NUM_CLIENTS and not h["rejected"]


# --------------------------------------------------------------------------------------
# In-process: the cores of the mod and the strategy.
# --------------------------------------------------------------------------------------
def _model_arrays(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(8, 6, generator=g).numpy(),
        "b": torch.randn(6, generator=g).numpy(),
        "steps": np.array(3 + seed, dtype=np.int64),
    }


def test_rejected_upload_never_changes_the_aggregate(caplog):
    base = _model_arrays(0)
    ups = []
    for c in range(3):
        local = {k: (v + 0.1 * (c + 1) * np.ones_like(v) if v.dtype.kind == "f" else v + c) for k, v in _model_arrays(0).items()}
        local["w"] = local["w"] + _model_arrays(c + 1)["w"]
        data, passthrough = encode_update(base, local, DGPCompressor())
        ups.append(ClientUpload(node=10 + c, payload=data, weight=float(c + 1), passthrough=passthrough))
    good, acc, rej = aggregate_updates(base, ups)
    assert acc == [10, 11, 12] and rej == []
    corrupted = bytearray(ups[1].payload)
    corrupted[len(corrupted) // 2] ^= 1
    other_model = encode(get_compressor("none").compress([torch.zeros(5)]))
    nan_payload = encode(SparsePayload(layers=(
        LayerPayload(48, None, torch.full((48,), float("nan"))), LayerPayload(6, None, torch.zeros(6)))))
    bad = [
        ClientUpload(20, bytes(corrupted), 5.0, ups[1].passthrough),
        ClientUpload(21, other_model, 5.0, ups[1].passthrough),
        ClientUpload(22, nan_payload, 5.0, ups[1].passthrough),
        ClientUpload(23, ups[0].payload, float("inf"), ups[0].passthrough),
        ClientUpload(24, None, 1.0, {}),
        ClientUpload(25, ups[0].payload, 1.0, {}),  # non-floating array missing
    ]
    mixed, acc2, rej2 = aggregate_updates(base, [ups[0], bad[0], ups[1], *bad[1:], ups[2]])
    assert acc2 == [10, 11, 12]
    reasons = dict(rej2)
    assert sorted(reasons) == [20, 21, 22, 23, 24, 25]
    assert "checksum" in reasons[20] and "layers" in reasons[21] and "NaN" in reasons[22]
    for k in base:
        assert np.array_equal(mixed[k], good[k]), k
        assert mixed[k].dtype == base[k].dtype
    # every client moved w by +0.1 (c+1) on average: the weighted mean update is non-zero
    assert not np.array_equal(good["b"], base["b"])
    # weighted mean of the passthrough int arrays 3, 4, 5 with weights 1, 2, 3 -> 4.33 -> 4
    assert int(good["steps"]) == 4
    none, acc3, rej3 = aggregate_updates(base, bad)
    assert none is None and acc3 == [] and len(rej3) == len(bad)


def test_update_is_global_plus_weighted_mean_of_decoded_updates():
    base = _model_arrays(0)
    locals_ = [_model_arrays(s) for s in (1, 2)]
    ups, dec = [], []
    for c, loc in enumerate(locals_):
        comp = DGPCompressor()
        data, pt = encode_update(base, loc, comp)
        ups.append(ClientUpload(c, data, float(c + 1), pt))
        dec.append(comp.decompress(decode(data), [(8, 6), (6,)]))
    new, _, _ = aggregate_updates(base, ups)
    for i, k in enumerate(("w", "b")):
        want = base[k] + ((dec[0][i] * 1.0 + dec[1][i] * 2.0) / 3.0).numpy()
        np.testing.assert_allclose(new[k], want, rtol=0, atol=1e-6)


def test_mod_state_survives_in_the_context_record_dict():
    # Two rounds through a RecordDict (as a simulation actor or SuperNode does) give
    # bitwise the payloads of one long-lived compressor with error feedback.
    params = {"top": 0.05, "keep": 0.2}
    base = _model_arrays(0)
    state = RecordDict()
    ref = DGPCompressor(**params)
    for rnd in range(3):
        local = _model_arrays(rnd + 5)
        comp = fl._load_compressor(state, "dgp", params)
        assert comp.rounds == rnd
        data, _ = encode_update(base, local, comp)
        fl._save_compressor(state, comp, ["w", "b"])
        want, _ = encode_update(base, local, ref)
        assert data == want
    assert "dgp.residuals" in state and "dgp.state" in state
    with pytest.raises(ValueError, match="top"):
        fl._load_compressor(state, "dgp", {"top": 0.1, "keep": 0.2})
    with pytest.raises(ValueError, match="compressor 'dgp'"):
        fl._load_compressor(state, "topk", {})
    # a seeded random compressor resumes its generator too
    st2, ref2 = RecordDict(), get_compressor("randk", seed=3)
    for _ in range(2):
        comp = fl._load_compressor(st2, "randk", {"seed": 3})
        data, _ = encode_update(base, _model_arrays(9), comp)
        fl._save_compressor(st2, comp, ["w", "b"])
        assert data == encode_update(base, _model_arrays(9), ref2)[0]


def test_top_feedback_param_reaches_the_compressor():
    mod = DGPMod("dgp", {"top_feedback": "drop"})
    state, ref = RecordDict(), DGPCompressor(top_feedback="drop")
    base = _model_arrays(0)
    for rnd in range(2):  # the policy holds across rounds restored from the context
        comp = fl._load_compressor(state, mod.compressor, mod.params)
        assert comp.top_feedback == "drop"
        data, _ = encode_update(base, _model_arrays(rnd + 5), comp)
        fl._save_compressor(state, comp, ["w", "b"])
        assert data == encode_update(base, _model_arrays(rnd + 5), ref)[0]
    with pytest.raises(ValueError, match="top_feedback"):
        DGPMod("dgp", {"top_feedback": "half"})


def test_encode_update_checks_the_model():
    base = _model_arrays(0)
    with pytest.raises(ValueError, match="do not match"):
        encode_update(base, {"w": base["w"]}, DGPCompressor())
    bad = dict(base, w=np.zeros((6, 8), np.float32))
    with pytest.raises(ValueError, match="'w'"):
        encode_update(base, bad, DGPCompressor())


def test_mod_rejects_bad_arguments():
    with pytest.raises(ValueError, match="compressor must be one of"):
        DGPMod("nope")
    with pytest.raises(ValueError, match="adgp"):
        DGPMod("adgp")
    with pytest.raises(TypeError, match="has no parameter 'x'"):
        DGPMod("dgp", {"x": 1})
    with pytest.raises(TypeError, match="params"):
        DGPMod("dgp", [1])
    with pytest.raises(ValueError, match="value_dtype"):
        DGPMod(value_dtype="int8")
    with pytest.raises(TypeError, match="arrayrecord_key"):
        DGPMod(arrayrecord_key="")


def test_missing_flwr_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr.app", None)  # makes `from flwr.app import` fail
    monkeypatch.delitem(sys.modules, "dgp_kernels.integrations.flower")
    with pytest.raises(ImportError, match=r"dgp_kernels\[flower\]"):
        importlib.import_module("dgp_kernels.integrations.flower")


# --------------------------------------------------------------------------------------
# In-process: the mod and the strategy on hand-made Flower messages.
# --------------------------------------------------------------------------------------
@pytest.fixture
def task_identity(monkeypatch):
    """Flower messages need a task identity (the runtime sets it; here we do)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _train_msg(arrays, node, rnd=1):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType

    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "config": ConfigRecord({"server-round": rnd}),
    })
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)


def _client(shift):
    """A fake ClientApp: 'trains' by adding ``shift`` to the floating arrays."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord

    def call_next(msg, context):
        rec = msg.content["arrays"]
        out = {k: Array(rec[k].numpy() + shift if rec[k].numpy().dtype.kind == "f" else rec[k].numpy())
               for k in rec.keys()}
        return Message(content=RecordDict({"arrays": ArrayRecord(out),
                                           "metrics": MetricRecord({"num-examples": 2, "loss": 0.5})}),
                       reply_to=msg)

    return call_next


def test_mod_and_strategy_on_messages(task_identity, caplog):
    from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType

    base = _model_arrays(0)
    mod = DGPMod("dgp", {"top": 0.0, "keep": 1.0})  # keep everything: the update is exact
    strategy = fl.DGPFedAvg()
    strategy._sent = {1: base}  # what configure_train records (it needs a Grid)
    replies = []
    for node, shift in ((7, 0.5), (8, 1.5)):
        ctx = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        reply = mod(_train_msg(base, node), ctx, _client(shift))
        rec = reply.content["arrays"]
        assert sorted(rec.keys()) == ["dgp.payload", "steps"]
        assert rec["dgp.payload"].numpy().dtype == np.uint8
        assert "dgp.residuals" in ctx.state and int(ctx.state["dgp.state"]["rounds"]) == 1
        replies.append(reply)
    # a non-train message passes through untouched
    ctx = Context(run_id=1, node_id=9, node_config={}, state=RecordDict(), run_config={})
    ev = Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in base.items()})}),
                 message_type=MessageType.EVALUATE, dst_node_id=9)
    assert mod(ev, ctx, lambda m, c: "passed") == "passed" and "dgp.state" not in ctx.state
    # bad replies: client error, no payload (mod missing), corrupted payload, no weight
    bad_msgs = []
    err = Message(Error(code=1, reason="client crashed"), reply_to=_train_msg(base, 20))
    bad_msgs.append(err)
    bad_msgs.append(_client(0.1)(_train_msg(base, 21), None))
    corrupted = bytearray(replies[0].content["arrays"]["dgp.payload"].numpy().tobytes())
    corrupted[-1] ^= 0xFF
    from flwr.app import MetricRecord

    bad_msgs.append(Message(content=RecordDict({
        "arrays": ArrayRecord({"dgp.payload": Array(np.frombuffer(bytes(corrupted), np.uint8).copy()),
                               "steps": Array(base["steps"])}),
        "metrics": MetricRecord({"num-examples": 100})}), reply_to=_train_msg(base, 22)))
    bad_msgs.append(Message(content=RecordDict({"arrays": replies[0].content["arrays"]}), reply_to=_train_msg(base, 23)))
    with caplog.at_level("WARNING", logger="dgp_kernels"):
        arrays, metrics = strategy.aggregate_train(1, [bad_msgs[0], replies[1], *bad_msgs[1:], replies[0]])
    dropped = {r[0]: r[1] for r in strategy.history[-1].rejected}
    assert sorted(dropped) == [20, 21, 22, 23]
    assert "client crashed" in dropped[20] and "dgp.payload" in dropped[21]
    assert "checksum" in dropped[22] and "num-examples" in dropped[23]
    for node in (20, 21, 22, 23):
        assert any(f"node {node}:" in r.getMessage() for r in caplog.records)
    assert strategy.history[-1].accepted == (7, 8)
    # equal weights: global + mean(0.5, 1.5) = global + 1.0 (float32 rounding of each step)
    for k in ("w", "b"):
        np.testing.assert_allclose(arrays[k].numpy(), base[k] + 1.0, rtol=0, atol=1e-6)
    assert int(arrays["steps"].numpy()) == int(base["steps"])
    assert metrics["loss"] == pytest.approx(0.5)
