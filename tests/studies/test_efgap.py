"""The error-feedback gap study (bench/studies/efgap.py) on a tiny run: its per-round metrics have the right ranges
and directions, the variants differ the way their definitions say, and the files are
written."""

import json
import math

import pytest

from dgp_kernels.sim import SimConfig
from bench.studies.efgap import (EF_GAP_METRICS, EFGapStudy, ef_gap_metrics, ef_gap_study, linear_fit,
                                 write_ef_gap)

ROUNDS = 6


@pytest.fixture(scope="module")
def study():
    return ef_gap_study(SimConfig(model="mlp", clients=3, rounds=ROUNDS, threads=1), seeds=[0, 1],
                        progress=False)


def test_metrics_ranges_and_directions(study):
    assert study.multi.labels == ["none", "dgp", "dgp top=0", "dgp EF off"]
    assert set(study.metrics) == {"dgp", "dgp top=0", "dgp EF off"}  # `none` has no residual
    for label, per_seed in study.metrics.items():
        assert len(per_seed) == 2
        for m in per_seed:
            assert set(m) == set(EF_GAP_METRICS) and all(len(v) == ROUNDS for v in m.values())
            never = m["never_sent_fraction"]
            assert all(0.0 <= v <= 1.0 for v in never)
            # "never sent so far" can only shrink: a coordinate once sent stays sent.
            assert all(b <= a for a, b in zip(never, never[1:])), never
            assert never[0] >= 0.75  # round 1 sends ~20% of each layer (floor per layer)
            for key in ("residual_norm", "grad_norm", "residual_max_abs"):
                assert all(math.isfinite(v) and v >= 0 for v in m[key]), key
            for key in ("residual_never_sent_share", "grad_never_sent_share", "top_never_sent_fraction",
                        "top_repeat_fraction"):
                assert all(0.0 <= v <= 1.0 + 1e-12 for v in m[key]), key
            assert all(g > 0 for g in m["grad_norm"])
            # the server's view: a coordinate no client sent is unsent by each client too
            never_any = m["server_never_received_fraction"]
            assert all(0.0 <= a <= b + 1e-12 for a, b in zip(never_any, never))
            assert all(b <= a for a, b in zip(never_any, never_any[1:]))
            # held by every client <= held by one client <= the top band
            assert all(0.0 <= v <= 0.05 + 1e-12 for v in m["top_held_by_all_fraction"])
    for m in study.metrics["dgp EF off"]:
        assert all(v == 0 for v in m["residual_norm"])  # no error feedback: no residual
    for m in study.metrics["dgp top=0"]:
        assert all(v == 0 for v in m["top_never_sent_fraction"])  # nothing is held at the top
        assert all(v == 0 for v in m["top_repeat_fraction"])
        assert m["residual_norm"][-1] > 0
    for m in study.metrics["dgp"]:
        # after round 1 the residual is everything not sent: its energy is all on never-sent
        assert m["residual_never_sent_share"][0] == pytest.approx(1.0)
        assert max(m["top_never_sent_fraction"]) > 0
        # no previous round to repeat in round 1; held entries stay in v = g + e, so many repeat
        assert m["top_repeat_fraction"][0] == 0 and max(m["top_repeat_fraction"]) > 0.3
    # The top cut keeps the largest entries in the residual: it ends larger than without it.
    mean_max = {lab: sum(m["residual_max_abs"][-1] for m in study.metrics[lab]) / 2
                for lab in ("dgp", "dgp top=0")}
    assert mean_max["dgp"] > mean_max["dgp top=0"]


def test_summary_and_files(study, tmp_path):
    rows = {r.label: r for r in study.multi.summary()}
    assert rows["none"].upload_fraction.mean == 1.0
    for lab in ("dgp", "dgp top=0", "dgp EF off"):
        assert rows[lab].upload_fraction.max < 0.3 and rows[lab].diff_vs_baseline.n == 2
    final = {r["label"]: r for r in study.final_rows()}
    assert final["dgp"]["never_sent_fraction"]["mean"] == pytest.approx(
        sum(m["never_sent_fraction"][-1] for m in study.metrics["dgp"]) / 2)
    paths = write_ef_gap(study, str(tmp_path), runs=True, extra={"note": "test"})
    md = open(paths["md"]).read()
    assert "Paired difference against none" in md and "| dgp top=0 |" in md and "no residual" in md
    d = json.loads(open(paths["json"]).read())
    assert d["seeds"] == [0, 1] and d["environment"] == {"note": "test"}
    assert len(d["per_seed"]) == 8 and len(d["curves"]["dgp"]["never_sent_fraction"]["mean"]) == ROUNDS
    assert "dgp" in d["max_residual_growth"] and "dgp EF off" not in d["max_residual_growth"]
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the runs folder rebuilds the same study (redraw / re-tabulate without re-running)
    again = EFGapStudy.load(str(tmp_path / "runs"))
    assert again.multi.labels == study.multi.labels and again.multi.seeds == [0, 1]
    assert again.metrics == study.metrics
    assert again.markdown() == md.rstrip("\n")


def test_helpers():
    slope, icpt, r2 = linear_fit([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    assert (slope, icpt, r2) == pytest.approx((2.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="distinct"):
        linear_fit([1.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match=">= 2 points"):
        linear_fit([1.0], [0.0])
    from dgp_kernels.sim import SimResult

    with pytest.raises(ValueError, match="diagnostics"):
        ef_gap_metrics(SimResult(config=SimConfig(), rounds=[{"round": 0}]))


def test_diagnostics_do_not_change_the_run(study):
    from dgp_kernels.sim import simulate

    plain = simulate(SimConfig(model="mlp", clients=3, rounds=ROUNDS, threads=1, defense="dgp", seed=1),
                     progress=False)
    diag = study.multi.runs["dgp"][1]
    assert diag.config.diagnostics and diag.config.seed == 1
    assert [r["test_accuracy"] for r in plain.rounds] == [r["test_accuracy"] for r in diag.rounds]
    assert all(plain.model_state[k].equal(diag.model_state[k]) for k in plain.model_state)


def test_tail_accuracy(study):
    from bench.studies.efgap import tail_accuracy

    res = study.multi.runs["dgp"][0]
    accs = [r["test_accuracy"] for r in res.rounds]
    assert tail_accuracy(res, 3) == pytest.approx(sum(accs[-3:]) / 3)
    assert tail_accuracy(res, 100) == pytest.approx(sum(accs) / len(accs))
    rows = {r["label"]: r for r in study.tail_rows(2)}
    assert rows["none"]["diff_vs_baseline"] is None
    diffs = [a - b for a, b in zip(rows["dgp"]["per_seed"], rows["none"]["per_seed"])]
    assert rows["dgp"]["diff_vs_baseline"]["mean"] == pytest.approx(sum(diffs) / 2)



def test_collapse_round():
    from dgp_kernels.sim import SimResult
    from bench.studies.efgap import collapse_round

    def res(accs):
        rounds = [{"round": i, "test_accuracy": a} for i, a in enumerate(accs)]
        return SimResult(config=SimConfig(), rounds=rounds)

    assert collapse_round(res([0.1, 0.5, 0.3, 0.12, 0.9])) == 4
    assert collapse_round(res([0.1, 0.12, 0.35, 0.1])) is None  # never reached 40 %
    assert collapse_round(res([0.1, None, 0.6, 0.2, 0.95])) is None
