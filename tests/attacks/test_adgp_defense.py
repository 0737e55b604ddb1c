"""The ``adgp`` attack-side defense: the victim's gradient at the positions a broadcaster
chose from its own gradient, values only on the wire; and the evaluator's broadcaster rule."""

import json

import pytest
import torch

from dgp_kernels import ops
from dgp_kernels.attacks import runner
from dgp_kernels.attacks.defenses import (
    apply_defense,
    defense_compressor,
    parse_defense,
)
from dgp_kernels.attacks.runner import EvalConfig, default_attacks, run_evaluation
from dgp_kernels.cases.models import lenet_sigmoid
from dgp_kernels.cases.targets import TargetSet
from dgp_kernels.cli import main
from dgp_kernels.ops import band_counts

from .conftest import smooth_images


def _grads(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


@pytest.fixture(scope="module")
def model_victim_broadcaster():
    torch.manual_seed(0)
    model = lenet_sigmoid(num_classes=4, channels=3, image_size=8)
    imgs = smooth_images(2, seed=1)
    victim = _grads(model, imgs[:1], torch.tensor([3]))
    other = _grads(model, imgs[1:], torch.tensor([1]))
    return model, victim, other


def test_spec_parsing_and_label_round_trip():
    s = parse_defense("adgp")
    assert s.label == "adgp:top=0.05,keep=0.2"
    assert parse_defense(s.label) == s and parse_defense(s) is s
    t = parse_defense("adgp:keep=0.3,top=0.1,value_dtype=bfloat16")
    assert t.label == "adgp:top=0.1,keep=0.3,value_dtype=bfloat16" and parse_defense(t.label) == t
    # no band for the DGP-aware attacker (the sent set is the broadcaster's band), density = keep
    assert s.band is None and t.band is None and t.density == 0.3
    # the simulator's adgp parameters: the broadcaster's band and the client's value dtype
    assert t.compressor_params() == {"top": 0.1, "keep": 0.3, "value_dtype": "bfloat16"}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("adgp:top=0.9,keep=0.2", "top \\+ keep must be <= 1"),
        ("adgp:keep=1.5", "keep"),
        ("adgp:top_feedback=full", "adgp has no parameter 'top_feedback'"),
        ("adgp:value_dtype=int8", "value_dtype"),
        ("adgp:positions=aggregate", "adgp has no parameter 'positions'"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_defense(spec)


def test_missing_or_misplaced_broadcaster_grads(model_victim_broadcaster):
    model, victim, other = model_victim_broadcaster
    with pytest.raises(ValueError, match="needs broadcaster_grads"):
        apply_defense("adgp", victim, model=model)
    with pytest.raises(ValueError, match="broadcaster_grads is only for adgp"):
        apply_defense("dgp", victim, model=model, broadcaster_grads=other)
    with pytest.raises(ValueError, match=r"broadcaster_grads\[0\] has shape"):
        apply_defense("adgp", victim, broadcaster_grads=[other[0].flatten()] + other[1:])
    with pytest.raises(ValueError, match="broadcaster_grads has 1 tensors"):
        apply_defense("adgp", victim, broadcaster_grads=other[:1])
    with pytest.raises(TypeError, match="broadcaster_grads must be a list"):
        apply_defense("adgp", victim, broadcaster_grads=other[0])
    # the multi-round helper has no broadcaster: a clear error, not a missing-positions crash
    with pytest.raises(ValueError, match="broadcaster_grads"):
        defense_compressor(parse_defense("adgp"), error_feedback=True, seed=0)


@pytest.mark.parametrize("top, keep", [(0.05, 0.2), (0.02, 0.1)])
def test_sent_at_the_broadcasters_band_exactly(model_victim_broadcaster, top, keep):
    model, victim, other = model_victim_broadcaster
    before = [g.clone() for g in victim], [g.clone() for g in other]
    d = apply_defense(f"adgp:top={top},keep={keep}", victim, model=model, broadcaster_grads=other)
    assert d.band is None and d.payload.aligned
    for i, (g, b, m, s) in enumerate(zip(victim, other, d.sent_mask, d.shared_grads)):
        n = g.numel()
        idx, _ = ops.select(b, top, keep)  # the broadcaster's own DGP band
        expected = torch.zeros(n, dtype=torch.bool)
        expected[idx] = True
        assert torch.equal(m.reshape(-1), expected), i
        assert int(m.sum()) == band_counts(n, top, keep)[1]
        assert torch.equal(d.positions.indices[i], torch.sort(idx).values)
        assert s.dtype == torch.float32 and s.shape == g.shape
        assert torch.equal(s[m], g[m]) and not s[~m].any()  # exact values, zeros elsewhere
        assert d.payload.layers[i].indices is None and d.payload.layers[i].k == int(m.sum())
    assert torch.equal(torch.cat([g.flatten() for g in victim]), torch.cat([g.flatten() for g in before[0]]))
    assert torch.equal(torch.cat([g.flatten() for g in other]), torch.cat([g.flatten() for g in before[1]]))


def test_values_only_upload_is_smaller_than_dgps(model_victim_broadcaster):
    model, victim, other = model_victim_broadcaster
    for top, keep in [(0.05, 0.2), (0.02, 0.1)]:
        a = apply_defense(f"adgp:top={top},keep={keep}", victim, broadcaster_grads=other)
        g = apply_defense(f"dgp:top={top},keep={keep}", victim)
        # the same count per layer, except that dgp sends a tensor whose band is empty (here
        # the 4-entry last bias) dense, and adgp sends no value of it
        assert a.sent_fraction < g.sent_fraction
        values = 4 * sum(int(m.sum()) for m in a.sent_mask)
        assert values < a.upload_bytes < g.upload_bytes  # values + header, no indices
    half = apply_defense("adgp:value_dtype=float16", victim, broadcaster_grads=other)
    full = apply_defense("adgp", victim, broadcaster_grads=other)
    assert half.upload_bytes < full.upload_bytes
    for h, v, m in zip(half.shared_grads, victim, half.sent_mask):
        assert torch.equal(h[m], v[m].to(torch.float16).float()) and not h[~m].any()


def test_own_gradient_as_broadcaster_is_dgp(model_victim_broadcaster):
    """Sanity link: were the broadcaster the victim itself, adgp would send DGP's band."""
    model, victim, _ = model_victim_broadcaster
    a = apply_defense("adgp", victim, broadcaster_grads=victim)
    g = apply_defense("dgp", victim)
    dense_in_dgp = 0
    for v, ma, mg, sa, sg in zip(victim, a.sent_mask, g.sent_mask, a.shared_grads, g.shared_grads):
        if band_counts(v.numel(), 0.05, 0.2)[1] > 0:
            assert torch.equal(ma, mg) and torch.equal(sa, sg)
        else:  # an empty band: dgp sends the tensor dense, adgp (the band itself) nothing
            assert mg.all() and not ma.any() and not sa.any()
            dense_in_dgp += 1
    assert dense_in_dgp == 1  # the last bias (4 classes)


def test_other_broadcaster_sends_some_of_the_victims_top_band(model_victim_broadcaster):
    """The point of measuring adgp: with another client's positions the victim's own top
    entries are no longer all withheld (here some of them are sent)."""
    model, victim, other = model_victim_broadcaster
    d = apply_defense("adgp", victim, broadcaster_grads=other)
    sent_top = 0
    for g, m in zip(victim, d.sent_mask):
        k_top = band_counts(g.numel(), 0.05, 0.2)[0]
        top = torch.topk(g.abs().reshape(-1), k_top).indices if k_top else torch.empty(0, dtype=torch.long)
        sent_top += int(m.reshape(-1)[top].sum())
    assert sent_top > 0


def test_deterministic(model_victim_broadcaster):
    model, victim, other = model_victim_broadcaster
    a = apply_defense("adgp", victim, broadcaster_grads=other, seed=0)
    b = apply_defense("adgp", victim, broadcaster_grads=other, seed=123)
    assert a.upload_bytes == b.upload_bytes
    for x, y, mx, my in zip(a.shared_grads, b.shared_grads, a.sent_mask, b.sent_mask):
        assert torch.equal(x, y) and torch.equal(mx, my)


def test_default_attacks_for_adgp():
    all_attacks = ["dlg", "idlg", "dlg-adaptive", "ig", "ig-adaptive", "ig-dgp-aware", "rtf"]
    # at DGP's defaults as DGP, minus the band-aware attack (no band)
    assert default_attacks(parse_defense("adgp"), all_attacks) == ["dlg-adaptive", "ig-adaptive", "rtf"]
    assert default_attacks(parse_defense("adgp:keep=0.1"), all_attacks) == ["ig-adaptive", "rtf"]


def _targets(n: int) -> TargetSet:
    return TargetSet(images=smooth_images(n, seed=5), labels=torch.arange(n) % 4,
                     names=[f"t{i}" for i in range(n)], num_classes=4, source="test")


def test_broadcaster_batch_rule():
    t = _targets(3)
    cfg = EvalConfig(grid=[("adgp", ["ig-adaptive"])], images=3, image_size=8, utility=False, device="cpu")
    # several batches: the next one, wrapping around
    for b_i, nxt in [(0, 1), (1, 2), (2, 0)]:
        xb, yb = runner._broadcaster_batch(cfg, t, b_i, [b_i], "cpu")
        assert torch.equal(xb, t.images[nxt:nxt + 1]) and torch.equal(yb, t.labels[nxt:nxt + 1])
    cfg2 = EvalConfig(grid=[("adgp", ["ig-adaptive"])], images=3, image_size=8, utility=False,
                      device="cpu", batch_size=2)
    xb, yb = runner._broadcaster_batch(cfg2, t, 1, [2], "cpu")  # last (short) batch -> first
    assert torch.equal(xb, t.images[0:2])
    # a single batch: a seeded noise batch of the same size, never the victim's images
    one = _targets(2)
    cfg3 = EvalConfig(grid=[("adgp", ["ig-adaptive"])], images=2, image_size=8, utility=False,
                      device="cpu", batch_size=2)
    xa, ya = runner._broadcaster_batch(cfg3, one, 0, [0, 1], "cpu")
    xb, yb = runner._broadcaster_batch(cfg3, one, 0, [0, 1], "cpu")
    assert xa.shape == one.images.shape and ya.shape == one.labels.shape
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, one.images) and 0 <= float(xa.min()) and float(xa.max()) < 1
    assert int(ya.min()) >= 0 and int(ya.max()) < 4


TINY = {"dlg-adaptive": {"iterations": 2, "max_iter": 4}, "ig-adaptive": {"iterations": 6}}


def _cfg(grid, images=2, **kw):
    return EvalConfig(grid=grid, images=images, image_size=8, attack_params=dict(TINY), utility=False,
                      device="cpu", **kw)


def test_run_evaluation_with_adgp_and_unchanged_dgp_rows(monkeypatch):
    calls = []

    def spy(spec, grads, **kw):
        out = apply_defense(spec, grads, **kw)
        calls.append((out.spec.label, [g.clone() for g in grads], kw.get("broadcaster_grads"), out))
        return out

    monkeypatch.setattr(runner, "apply_defense", spy)
    grid = [("adgp", ["dlg-adaptive", "ig-adaptive"]), ("dgp", ["ig-adaptive"])]
    r = run_evaluation(_cfg(grid), progress=False)
    d = {x.defense: x for x in r.defenses}
    a, g = d["adgp:top=0.05,keep=0.2"], d["dgp:top=0.05,keep=0.2"]
    assert a.band is None and g.band == (0.05, 0.2)
    assert a.upload_bytes < g.upload_bytes and a.sent_fraction <= g.sent_fraction
    got = {(x.defense, x.attack, x.image) for x in r.attacks}
    assert got == {(s, at, i) for s, atks in [(a.defense, grid[0][1]), (g.defense, grid[1][1])]
                   for at in atks for i in range(2)}
    # the broadcaster of batch b is the other photo's update on batch b's (seeded) model
    t = r.targets
    adgp_calls = [c for c in calls if c[0] == a.defense]
    assert len(adgp_calls) == 2  # one per batch: both attacks share the honest model
    for b_i, (v, o) in enumerate([(0, 1), (1, 0)]):
        model = runner._build_model(r.config, t, seed=r.config.seed * 1_000_003 + b_i, device="cpu")
        victim = runner.client_update(model, t.images[v:v + 1], t.labels[v:v + 1])
        bcast = runner.client_update(model, t.images[o:o + 1], t.labels[o:o + 1])
        _, sent_grads, b_grads, out = adgp_calls[b_i]
        assert all(torch.equal(x, y) for x, y in zip(sent_grads, victim))
        assert all(torch.equal(x, y) for x, y in zip(b_grads, bcast))
        ref = apply_defense("adgp", victim, broadcaster_grads=bcast, model=model)
        assert all(torch.equal(x, y) for x, y in zip(out.shared_grads, ref.shared_grads))
    assert all(c[2] is None for c in calls if c[0] != a.defense)
    # the dgp rows are bit-identical to a run without adgp in the grid
    alone = run_evaluation(_cfg([("dgp", ["ig-adaptive"])]), progress=False)
    key = ("dgp:top=0.05,keep=0.2", "ig-adaptive")
    assert torch.equal(alone.reconstructions[key], r.reconstructions[key])
    assert [x.psnr for x in alone.attacks] == [x.psnr for x in r.attacks if x.defense == key[0]]


def test_cli_end_to_end_with_adgp(tmp_path, capsys, monkeypatch):
    budgets = {k: dict(v) for k, v in runner.ATTACK_BUDGETS.items()}
    budgets["dlg-adaptive"]["max_iter"] = 4
    monkeypatch.setattr(runner, "ATTACK_BUDGETS", budgets)
    out = tmp_path / "run"
    rc = main(["evaluate", "--image-size", "8", "--images", "1", "--iterations", "0.005", "--no-utility",
               "--no-progress", "--device", "cpu", "--defenses", "dgp", "adgp", "--attacks", "ig-adaptive",
               "--out", str(out)])
    assert rc == 0
    assert "adgp:top=0.05,keep=0.2" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert {(r["defense"], r["attack"]) for r in data["attacks"]} == {
        (d, "ig-adaptive") for d in ("dgp:top=0.05,keep=0.2", "adgp:top=0.05,keep=0.2")}
    up = {r["defense"]: r["upload_bytes"] for r in data["defenses"]}
    assert up["adgp:top=0.05,keep=0.2"] < up["dgp:top=0.05,keep=0.2"]


def test_utility_runs_adgp_in_the_simulator():
    from dgp_kernels.sim import simulate_defense

    out = runner.run_utility(["dgp", "adgp"], trainer=simulate_defense, rounds=1, progress=False, clients=2)
    assert [u.defense for u in out] == ["dgp:top=0.05,keep=0.2", "adgp:top=0.05,keep=0.2"]
    assert 0.0 <= out[1].final_accuracy <= 1.0
    assert out[1].upload_bytes_per_round < out[0].upload_bytes_per_round
