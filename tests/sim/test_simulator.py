"""The simulator: bitwise determinism, bytes = real payload lengths, dropped clients never
touch the aggregate, every defense learns, FedAvg / sampling / non-IID, bad configs."""

import math

import pytest
import torch

from dgp_kernels.codec import encode
from dgp_kernels.sim import Fault, SimConfig, simulate
from dgp_kernels.sim import simulator as simmod
from dgp_kernels.sim.config import DEFENSES

# Tiny and fast: the 4.8k-parameter MLP on the built-in digits, 1 thread.
FAST = dict(model="mlp", clients=4, threads=1)


def run(**kw):
    cfg = dict(FAST)
    cfg.update(kw)
    faults = cfg.pop("faults", None)
    return simulate(SimConfig(**cfg), progress=False, faults=faults)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def strip_times(rounds):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rounds]


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(defense="dgp", rounds=4),
    # random compressor, client sampling, non-IID split, FedAvg: every seeded stream
    dict(defense="randk", algorithm="fedavg", participation=0.5, split="dirichlet", alpha=0.3,
         rounds=3, clients=6),
    dict(defense="dp", defense_params={"noise_multiplier": 0.1}, rounds=3),
])
def test_same_config_same_bits(kw):
    a, b = run(**kw), run(**kw)
    assert strip_times(a.rounds) == strip_times(b.rounds)
    assert same_state(a.model_state, b.model_state)
    c = run(**dict(kw, seed=1))
    assert not same_state(a.model_state, c.model_state)


@pytest.mark.parametrize("kw", [
    dict(defense="dgp", defense_params={"top_feedback": "drop"}, diagnostics=True),
    dict(defense="adgp", diagnostics=True),
    # sampled clients, non-IID split, a schedule step inside the prefix
    dict(defense="none", participation=0.5, split="dirichlet", alpha=0.3, clients=6,
         lr_steps=[[2, 0.05]]),
    dict(defense="randk", algorithm="fedavg"),
])
def test_prefix_of_a_longer_run_is_the_shorter_run(kw):
    short, long = run(rounds=3, **kw), run(rounds=6, **kw)
    cut = long.prefix(3)
    assert strip_times(cut.rounds) == strip_times(short.rounds)
    assert cut.config == short.config and cut.final_accuracy == short.final_accuracy
    assert cut.total_upload_bytes == short.total_upload_bytes and cut.model_state is None
    assert strip_times(long.prefix(6).rounds) == strip_times(long.rounds)
    with pytest.raises(ValueError, match="rounds must be in"):
        long.prefix(7)
    with pytest.raises(TypeError, match="rounds must be an int"):
        long.prefix(2.0)
    sparse = run(defense="none", rounds=4, eval_every=2)
    assert sparse.prefix(2).final_accuracy == sparse.rounds[1]["test_accuracy"]
    with pytest.raises(ValueError, match="not evaluated"):
        sparse.prefix(3)


def test_simulate_leaves_global_rng_and_threads_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    run(defense="none", rounds=1, threads=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", ["none", "dgp", "adgp", "qsgd"])
def test_upload_bytes_are_the_payload_lengths(monkeypatch, defense):
    seen = []
    real = simmod.decode_accumulate

    def spy(payloads, *a, **k):
        seen.append([len(p) for p in payloads])
        return real(payloads, *a, **k)

    monkeypatch.setattr(simmod, "decode_accumulate", spy)
    res = run(defense=defense, rounds=3)
    assert [r["upload_bytes"] for r in res.rounds] == [sum(s) for s in seen]
    assert all(len(s) == 4 for s in seen)  # every client's payload reached the server
    assert res.total_upload_bytes == sum(map(sum, seen))
    n = res.num_params
    if defense == "none":
        # Wire format v1 dense payload: 16-byte header, 28 bytes per layer, 4 bytes per
        # float32 value, 4-byte CRC; the MLP has 4 parameter tensors.
        assert seen[0] == [16 + 28 * 4 + 4 * n + 4] * 4
        assert res.dense_bytes == 4 * n
    elif defense == "qsgd":  # dense float32 values plus one meta entry (levels)
        assert seen[0] == [16 + (1 + len("qsgd_levels") + 8) + 28 * 4 + 4 * n + 4] * 4
    else:  # 20% of the values, with or without positions
        assert 0 < res.total_upload_bytes < 0.3 * 3 * 4 * 4 * n
    assert all(r["download_bytes"] > 0 for r in res.rounds)


def test_download_is_the_encoded_broadcast(monkeypatch):
    sizes = []
    real = simmod.broadcast_nbytes
    monkeypatch.setattr(simmod, "broadcast_nbytes", lambda u: sizes.append(real(u)) or sizes[-1])
    res = run(defense="dgp", rounds=2)
    assert [r["download_bytes"] for r in res.rounds] == [4 * s for s in sizes]  # 4 clients


def test_broadcast_nbytes_picks_sparse_or_dense():
    dense = [torch.arange(1, 1001, dtype=torch.float32)]
    assert simmod.broadcast_nbytes(dense) == 16 + 28 + 4 * 1000 + 4
    sparse = torch.zeros(1000)
    sparse[::10] = 1.0
    n = simmod.broadcast_nbytes([sparse])
    assert n == len(encode(simmod.SparsePayload(layers=(simmod.LayerPayload(
        1000, torch.arange(0, 1000, 10), torch.ones(100)),))))
    assert n < 4 * 1000 / 3


def test_adgp_download_charges_positions_and_aggregate(monkeypatch):
    pos_sizes = []
    real_pos = simmod.positions_nbytes
    monkeypatch.setattr(simmod, "positions_nbytes", lambda p: pos_sizes.append(real_pos(p)) or pos_sizes[-1])
    res = run(defense="adgp", rounds=2)
    assert all(s > 16 + 28 * 4 for s in pos_sizes) and len(pos_sizes) == 2
    # The aggregate is values only: k float32 per layer, header, table, CRC.
    k = sum(simmod.band_counts(p.numel(), 0.05, 0.2)[1]
            for p in simmod.build_model(res.config).parameters())
    agg = 16 + 28 * 4 + 4 * k + 4
    assert [r["download_bytes"] for r in res.rounds] == [4 * (p + agg) for p in pos_sizes]
    assert res.rounds[0]["upload_bytes"] == 4 * agg  # uploads are values only too


def test_adgp_default_positions_are_the_fresh_band(monkeypatch):
    # The broadcaster re-chooses from its own gradient every round and never observes the
    # aggregate; positions="aggregate" observes it from round 2 on.
    calls = {"choose": 0, "observe": 0}
    for name in calls:
        real = getattr(simmod.Broadcaster, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(simmod.Broadcaster, name, spy)
    default = run(defense="adgp", rounds=3)
    assert calls == {"choose": 3, "observe": 0}
    fresh = run(defense="adgp", defense_params={"positions": "fresh"}, rounds=3)
    assert same_state(default.model_state, fresh.model_state)
    calls.update(choose=0, observe=0)
    run(defense="adgp", defense_params={"positions": "aggregate"}, rounds=3)
    assert calls == {"choose": 1, "observe": 3}
    calls.update(choose=0, observe=0)
    gradient = run(defense="adgp", defense_params={"positions": "gradient"}, rounds=3)
    assert calls == {"choose": 3, "observe": 0}
    assert not same_state(default.model_state, gradient.model_state)


def test_adgp_fresh_ranks_the_broadcasters_gradient_plus_its_residual(monkeypatch):
    # "fresh": the broadcaster keeps an ADGP residual e at its own positions and ranks g + e
    # (rank 0's rule in the DDP hook); "gradient": it ranks g alone.
    from dgp_kernels.compressor.adgp import ADGPCompressor
    ranked, positions, own = [], [], []
    real_choose, real_compress = simmod.Broadcaster.choose, ADGPCompressor.compress

    def choose(self, tensors):
        ranked.append([t.clone() for t in tensors])
        positions.append(real_choose(self, tensors))
        return positions[-1]

    def compress(self, grads):
        if len(own) < len(positions):  # the first compress after choose: the broadcaster's
            own.append([g.clone() for g in grads])
        return real_compress(self, grads)
    monkeypatch.setattr(simmod.Broadcaster, "choose", choose)
    monkeypatch.setattr(ADGPCompressor, "compress", compress)
    run(defense="adgp", rounds=4)
    assert len(ranked) == len(own) == 4
    assert all(torch.equal(a, b) for a, b in zip(ranked[0], own[0]))  # no residual yet
    for r in range(1, 4):
        for i, (v_prev, g, v) in enumerate(zip(ranked[r - 1], own[r], ranked[r])):
            e = v_prev.reshape(-1).clone()
            e[positions[r - 1].indices[i]] = 0  # what it kept: everything it did not send
            assert torch.equal(v.reshape(-1), g.reshape(-1) + e), (r, i)


def test_dgp_top_feedback_reaches_the_clients_and_reports_drops():
    full = run(defense="dgp", rounds=2, diagnostics=True)
    clipped = run(defense="dgp", defense_params={"top_feedback": "clipped"}, rounds=2, diagnostics=True)
    assert all(r["top_dropped_l1"] == 0 for r in full.rounds)
    assert all(r["top_dropped_l1"] > 0 for r in clipped.rounds)
    with pytest.raises(ValueError, match="top_feedback"):
        SimConfig(defense="dgp", defense_params={"top_feedback": "half"}).validate()


# --------------------------------------------------------------------------------------
# Compression off == no compression, bitwise (the payload paths lose nothing)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense,params", [
    ("dgp", dict(top=0.0, keep=1.0)),
    ("adgp", dict(top=0.0, keep=1.0)),
    ("adgp", dict(top=0.0, keep=1.0, positions="aggregate")),
    ("topk", dict(keep=1.0)),
])
def test_full_band_equals_none(defense, params):
    base = run(defense="none", rounds=3)
    res = run(defense=defense, defense_params=params, rounds=3)
    assert same_state(base.model_state, res.model_state)


# --------------------------------------------------------------------------------------
# Failing clients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", ["dgp", "adgp"])
@pytest.mark.parametrize("kind", ["raise", "corrupt", "truncate", "nan_payload"])
def test_dropped_client_does_not_touch_the_aggregate(defense, kind):
    absent = run(defense=defense, rounds=1, faults=[Fault(0, 2, "absent")])
    faulty = run(defense=defense, rounds=1, faults=[Fault(0, 2, kind)])
    clean = run(defense=defense, rounds=1)
    # The round completes with the three others, exactly as if client 2 never answered.
    assert same_state(faulty.model_state, absent.model_state)
    assert not same_state(faulty.model_state, clean.model_state)
    (drop,) = faulty.rounds[0]["dropped"]
    assert drop["client"] == 2
    want_stage = {"raise": "train", "corrupt": "decode", "truncate": "decode", "nan_payload": "decode"}
    assert drop["stage"] == want_stage[kind]
    assert {"raise": "injected", "corrupt": "checksum", "truncate": "truncat",
            "nan_payload": "NaN"}[kind].lower() in drop["reason"].lower()
    if kind == "raise":  # nothing was sent
        assert faulty.rounds[0]["upload_bytes"] == absent.rounds[0]["upload_bytes"]
    else:  # the bytes that arrived are counted
        assert faulty.rounds[0]["upload_bytes"] > absent.rounds[0]["upload_bytes"]


def test_run_continues_after_drops_and_real_exceptions(monkeypatch, caplog):
    real = simmod._Client.next_batch
    calls = {"n": 0}

    def flaky(self, bs):
        calls["n"] += 1
        if self.cid == 1 and calls["n"] % 2:
            raise OSError("disk on fire")
        return real(self, bs)

    monkeypatch.setattr(simmod._Client, "next_batch", flaky)
    with caplog.at_level("WARNING", logger="dgp_kernels.sim"):
        res = run(defense="dgp", rounds=4, faults=[Fault(1, 0, "corrupt"), Fault(2, 3, "absent")])
    reasons = [d["reason"] for r in res.rounds for d in r["dropped"]]
    assert any("OSError: disk on fire" in x for x in reasons)
    assert len(res.rounds) == 4 and res.final_accuracy > 0
    assert "dropped" in caplog.text


def test_all_clients_dropped_leaves_model_unchanged():
    faults = [Fault(0, c, "absent") for c in range(4)]
    res = run(defense="none", rounds=1, faults=faults)
    init = simmod.build_model(res.config).state_dict()
    assert same_state(init, res.model_state)
    assert res.rounds[0]["upload_bytes"] == 0 and res.rounds[0]["download_bytes"] == 0


# --------------------------------------------------------------------------------------
# Every defense learns
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", DEFENSES)
def test_each_defense_learns(defense):
    params = {"noise_multiplier": 0.01} if defense == "dp" else {}
    res = run(defense=defense, defense_params=params, rounds=20, eval_every=10)
    assert res.final_accuracy > 0.25, res.final_accuracy  # chance is 0.10
    assert [r["test_accuracy"] is None for r in res.rounds] == [i not in (9, 19) for i in range(20)]


def test_fedavg_noniid_sampling():
    res = run(defense="dgp", algorithm="fedavg", local_epochs=2, participation=0.5, clients=6,
              split="dirichlet", alpha=0.5, rounds=4, lr=0.05)
    assert all(len(r["participants"]) == 3 for r in res.rounds)
    assert len({tuple(r["participants"]) for r in res.rounds}) > 1
    assert res.final_accuracy > 0.25


def test_convnet_with_batchnorm_model_runs():
    # lenet_sigmoid has image_size; resnet18 has BatchNorm buffers (averaged, not charged).
    res = run(defense="none", model="lenet_sigmoid", rounds=1)
    assert math.isfinite(res.final_loss)
    res = run(defense="dgp", model="resnet18_cifar", clients=2, rounds=1, batch_size=4, test_limit=20)
    assert math.isfinite(res.final_loss)
    assert any("running_mean" in k for k in res.model_state)


def test_lr_steps_and_diagnostics():
    res = run(defense="dgp", rounds=3, lr_steps=[[1, 0.05], [2, 0.01]], diagnostics=True)
    assert [r["lr"] for r in res.rounds] == [0.1, 0.05, 0.01]
    r = res.rounds[-1]
    for key in ("grad_norm", "residual_norm", "residual_never_sent_norm", "never_sent_fraction",
                "top_never_sent_fraction"):
        assert key in r and r[key] >= 0
    assert r["residual_never_sent_norm"] <= r["residual_norm"] + 1e-9
    assert 0 < r["never_sent_fraction"] < 0.8  # 20% per round: more than that after 3 rounds
    assert r["top_never_sent_fraction"] > 0


# --------------------------------------------------------------------------------------
# Bad configs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,exc,match", [
    ("dataset", "svhn", ValueError, "SimConfig.dataset must be one of"),
    ("model", "vgg", ValueError, "SimConfig.model"),
    ("defense", "soteria", ValueError, "SimConfig.defense must be one of"),
    ("clients", 0, ValueError, "SimConfig.clients must be an int >= 1"),
    ("clients", 2.5, TypeError, "SimConfig.clients must be an int"),
    ("rounds", True, TypeError, "SimConfig.rounds"),
    ("lr", 0.0, ValueError, "SimConfig.lr"),
    ("lr", float("nan"), ValueError, "SimConfig.lr"),
    ("momentum", 1.5, ValueError, "SimConfig.momentum"),
    ("participation", 0.0, ValueError, "SimConfig.participation"),
    ("algorithm", "fedprox", ValueError, "SimConfig.algorithm"),
    ("split", "shards", ValueError, "SimConfig.split"),
    ("alpha", -1, ValueError, "SimConfig.alpha"),
    ("lr_steps", [[1]], ValueError, r"SimConfig.lr_steps\[0\]"),
    ("device", "gpu7", ValueError, "SimConfig.device"),
    ("threads", 0, ValueError, "SimConfig.threads"),
    ("defense_params", {"top": 0.9}, ValueError, "defense 'none'.*no parameter 'top'"),
])
def test_bad_config_values(field, value, exc, match):
    if field == "defense_params":
        exc = TypeError
    with pytest.raises(exc, match=match):
        SimConfig(**{field: value}).validate()


def test_bad_defense_params_name_the_parameter():
    with pytest.raises(ValueError, match="defense 'dgp'.*top"):
        SimConfig(defense="dgp", defense_params={"top": 0.9, "keep": 0.5}).validate()
    with pytest.raises(TypeError, match="defense 'dgp'.*no parameter 'topp'"):
        SimConfig(defense="dgp", defense_params={"topp": 0.1}).validate()
    with pytest.raises(ValueError, match="positions"):
        SimConfig(defense="adgp", defense_params={"positions": "random"}).validate()
    with pytest.raises(TypeError, match="config must be a SimConfig"):
        simulate({"defense": "dgp"})
    with pytest.raises(ValueError, match="Fault.kind"):
        Fault(0, 0, "explode")
    with pytest.raises(ValueError, match="unknown SimConfig fields"):
        SimConfig.from_dict({"defence": "dgp"})


def test_fedavg_full_band_equals_none():
    kw = dict(rounds=2, algorithm="fedavg", split="dirichlet")
    base = run(defense="none", **kw)
    dgp = run(defense="dgp", defense_params=dict(top=0.0, keep=1.0), **kw)
    assert same_state(base.model_state, dgp.model_state)
    # ADGP's weighted mean (aggregate_aligned) rounds differently from the accumulator's
    # (a fused multiply-add may be used), so equal up to float32 rounding only.
    adgp = run(defense="adgp", defense_params=dict(top=0.0, keep=1.0), **kw)
    for k, v in base.model_state.items():
        torch.testing.assert_close(adgp.model_state[k], v, rtol=1e-5, atol=1e-6)


def test_fresh_top_sent_fraction_diagnostic():
    # Of each round's k_top largest gradient entries per layer, the share sent that round:
    # 0 when nothing but the gradient is ranked (round 1, or no error feedback), and in
    # [0, 1] once residuals re-rank the entries.
    ef = run(defense="dgp", rounds=4, diagnostics=True)
    assert ef.rounds[0]["fresh_top_sent_fraction"] == 0.0
    assert all(0.0 <= r["fresh_top_sent_fraction"] <= 1.0 for r in ef.rounds)
    assert any(r["fresh_top_sent_fraction"] > 0.0 for r in ef.rounds[1:])
    off = run(defense="dgp", defense_params={"error_feedback": False}, rounds=3, diagnostics=True)
    assert all(r["fresh_top_sent_fraction"] == 0.0 for r in off.rounds)
