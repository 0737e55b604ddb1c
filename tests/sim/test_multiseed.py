"""Multi-seed runs: the statistics (mean, std, paired difference, t-interval) on known
numbers, ``--seeds`` parsing, and a tiny 2-seed ``dgp train`` run end to end."""

import csv
import json
import math

import pytest

from dgp_kernels.cli import main
from dgp_kernels.sim import MultiSeedResult, SimConfig, SimResult, parse_seeds, simulate, simulate_seeds
from dgp_kernels.sim.multiseed import describe, t_quantile_975

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(defense, acc, upload, seed=0):
    """A SimResult with two rounds; the last is evaluated at ``acc``."""
    cfg = SimConfig(defense=defense, seed=seed)
    rounds = [
        {"round": 0, "test_accuracy": None, "test_loss": None, "upload_bytes": upload // 2,
         "download_bytes": 10, "wall_s": 1.0, "participants": [0], "dropped": []},
        {"round": 1, "test_accuracy": acc, "test_loss": 1.0, "upload_bytes": upload - upload // 2,
         "download_bytes": 10, "wall_s": 2.0, "participants": [0], "dropped": []},
    ]
    return SimResult(config=cfg, rounds=rounds)


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------
def test_describe_known_numbers():
    s = describe([4.0, 1.0, 3.0, 2.0])
    assert s.n == 4 and s.mean == 2.5 and s.min == 1.0 and s.max == 4.0 and s.median == 2.5
    assert describe([5.0, -1.0, 100.0]).median == 5.0
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std, n - 1
    assert s.std == pytest.approx(std, rel=1e-12)
    half = 3.1824 * std / 2.0  # t_{0.975, 3} * std / sqrt(4)
    assert (s.ci95_low, s.ci95_high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-4)
    one = describe([0.7])
    assert one.mean == one.median == 0.7 and math.isnan(one.std) and math.isnan(one.ci95_low)
    with pytest.raises(ValueError, match="at least one"):
        describe([])


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [60, 120, 1000]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="df"):
            t_quantile_975(bad)


def test_paired_difference_on_known_numbers():
    none = [fake_run("none", a, 1000, s) for s, a in enumerate([0.90, 0.80, 0.70])]
    dgp = [fake_run("dgp", a, u, s) for s, (a, u) in enumerate([(0.92, 200), (0.79, 250), (0.71, 240)])]
    multi = MultiSeedResult(labels=["none", "dgp"], seeds=[0, 1, 2], baseline="none",
                            runs={"none": none, "dgp": dgp})
    per = multi.per_seed_rows()
    assert [(r["label"], r["seed"]) for r in per] == [("none", 0), ("none", 1), ("none", 2),
                                                        ("dgp", 0), ("dgp", 1), ("dgp", 2)]
    assert [r["accuracy_minus_baseline"] for r in per[3:]] == pytest.approx([0.02, -0.01, 0.01])
    assert [r["upload_vs_baseline"] for r in per[3:]] == pytest.approx([0.2, 0.25, 0.24])
    base, row = multi.summary()
    assert base.diff_vs_baseline is None and base.accuracy.mean == pytest.approx(0.8)
    assert base.accuracy.std == pytest.approx(0.1)
    d = row.diff_vs_baseline
    mean = (0.02 - 0.01 + 0.01) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in (0.02, -0.01, 0.01)) / 2)
    assert d.mean == pytest.approx(mean) and d.std == pytest.approx(std)
    assert d.ci95_high - d.mean == pytest.approx(4.3027 * std / math.sqrt(3), rel=1e-4)
    assert row.upload_fraction.mean == pytest.approx(0.23)
    assert row.upload_bytes == pytest.approx(230.0) and row.wall_s == pytest.approx(6.0)
    md = multi.markdown()
    assert "| none | defaults | 3 | 80.00 ± 10.00 |" in md
    assert f"{100 * mean:+.2f} ± {100 * std:.2f}" in md


# --------------------------------------------------------------------------------------
# --seeds
# --------------------------------------------------------------------------------------
def test_parse_seeds():
    assert parse_seeds("5") == [0, 1, 2, 3, 4]
    assert parse_seeds(" 0, 1,2,3,4 ") == [0, 1, 2, 3, 4]
    assert parse_seeds("7,") == [7] and parse_seeds("1") == [0]
    for bad in ("", "0", "-1", "a", "1,1", "1,-2", "1.5", ","):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_seeds_and_seed_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--seed", "1", "--seeds", "2", "--out", str(tmp_path)])
    assert e.value.code == 2 and "not allowed with argument --seed" in capsys.readouterr().err
    rc = main(["train", "--seeds", "0", "--rounds", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 2 and "--seeds" in capsys.readouterr().err


def test_simulate_seeds_rejects_bad_input():
    cfg = SimConfig(model="mlp", clients=2, rounds=1)
    with pytest.raises(ValueError, match="labels="):
        simulate_seeds([cfg, cfg], [0], progress=False)
    with pytest.raises(ValueError, match="baseline"):
        simulate_seeds([cfg], [0], baseline="dgp", progress=False)
    with pytest.raises(ValueError, match="twice"):
        simulate_seeds([cfg], [0, 0], progress=False)
    with pytest.raises(ValueError, match=r"seeds\[0\] must be an int >= 0"):
        simulate_seeds([cfg], [-1], progress=False)
    with pytest.raises(TypeError, match=r"seeds\[1\] must be an int"):
        simulate_seeds([cfg], [0, 1.0], progress=False)
    with pytest.raises(TypeError, match="SimConfig"):
        simulate_seeds([{"defense": "none"}], [0], progress=False)


# --------------------------------------------------------------------------------------
# End to end: `dgp train --seeds 2`
# --------------------------------------------------------------------------------------
def test_train_two_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--defenses", "none,dgp", "--model", "mlp", "--clients", "3", "--rounds", "3",
               "--seeds", "2", "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Δ vs none" in text and "| dgp | defaults | 2 |" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["baseline"] == "none"
    per = summary["per_seed"]
    assert [(r["label"], r["seed"]) for r in per] == [("none", 0), ("none", 1), ("dgp", 0), ("dgp", 1)]
    runs = {(d, s): json.loads((out / f"{d}-seed{s}.json").read_text())
            for d in ("none", "dgp") for s in (0, 1)}
    for r in per:
        run = runs[(r["label"], r["seed"])]
        assert run["config"]["seed"] == r["seed"] and len(run["rounds"]) == 3
        assert r["final_accuracy"] == run["final_accuracy"]
        assert r["accuracy_minus_baseline"] == pytest.approx(
            run["final_accuracy"] - runs[("none", r["seed"])]["final_accuracy"])
    rows = {r["label"]: r for r in summary["summary"]}
    assert rows["none"]["diff_vs_baseline"] is None
    diffs = [r["accuracy_minus_baseline"] for r in per if r["label"] == "dgp"]
    assert rows["dgp"]["diff_vs_baseline"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert rows["dgp"]["diff_vs_baseline"]["n"] == 2
    assert 0.1 < rows["dgp"]["upload_fraction"]["mean"] < 0.3
    assert len(list(csv.DictReader((out / "seeds.csv").open()))) == 4
    assert (out / "summary.md").read_text().startswith("| defense |")
    for png in ("accuracy_vs_round.png", "accuracy_vs_upload.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    # Each seed's run is the single-seed run with that seed (bitwise: same accuracies).
    single = simulate(SimConfig(defense="dgp", model="mlp", clients=3, rounds=3, seed=1, threads=1),
                      progress=False)
    from_multi = [r["test_accuracy"] for r in runs[("dgp", 1)]["rounds"]]
    assert [r["test_accuracy"] for r in single.rounds] == from_multi
