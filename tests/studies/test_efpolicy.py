"""The top-band policy study (bench/studies/efpolicy.py) on a tiny run: it resumes from the
runs already written, tabulates the seeds every variant completed, pairs against the
authors' DGP, and writes its files."""

import json
import os

import pytest

from dgp_kernels.sim import SimConfig
from bench.studies.efpolicy import (EF_POLICY_VARIANTS, load_policy_study, policy_markdown, policy_rows,
                                    run_policy_study, write_ef_policies)

BASE = SimConfig(model="mlp", clients=3, rounds=4, threads=1)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("efpol"))
    run_policy_study(BASE, [0, 1], d, progress=False)
    return d


def test_resume_and_complete_seeds(out):
    assert run_policy_study(BASE, [0, 1], out, progress=False) == []  # nothing is re-run
    # A seed with only some variants is left out of the table.
    run_policy_study(BASE, [2], out, variants=EF_POLICY_VARIANTS[:2], progress=False)
    study = load_policy_study(out)
    assert study.multi.seeds == [0, 1]
    assert study.multi.labels == [v[0] for v in EF_POLICY_VARIANTS]
    assert set(study.metrics) == {lab for lab, d, _ in EF_POLICY_VARIANTS if d != "none"}
    with pytest.raises(ValueError, match="no seed"):
        load_policy_study(out, seeds=[7])


def test_rows_pair_against_dgp_and_none(out):
    study = load_policy_study(out)
    rows = {r["label"]: r for r in policy_rows(study)}
    none, full = rows["none"], rows["dgp full"]
    assert none["diff_vs_baseline"] is None and "diff_vs_reference" not in full
    for lab, r in rows.items():
        acc = r["per_seed"]
        if lab != "dgp full":
            want = [a - b for a, b in zip(acc, full["per_seed"])]
            assert r["diff_vs_reference"]["mean"] == pytest.approx(sum(want) / len(want))
    # Same band counts: every DGP policy uploads within 1 % of the authors' DGP.
    for lab in ("dgp clipped", "dgp floor", "dgp drop", "dgp top=0"):
        u = rows[lab]["upload_vs_reference"]
        assert 0.99 < u["min"] <= u["max"] < 1.01, (lab, u)
    assert rows["dgp full"]["dropped_l1"]["max"] == 0.0
    assert rows["dgp drop"]["dropped_l1"]["min"] > 0.0
    for lab in ("dgp full", "dgp clipped", "dgp floor", "dgp drop"):
        assert 0.0 <= rows[lab]["fresh_top_sent"]["mean"] <= 1.0
    md = policy_markdown(study)
    assert "gap closed" in md and "| dgp floor |" in md


def test_files(out):
    paths = write_ef_policies(load_policy_study(out), out, extra={"machine": "test"})
    for p in paths.values():
        assert os.path.getsize(p) > 0
    d = json.load(open(paths["json"]))
    assert d["environment"] == {"machine": "test"} and len(d["policies"]) == len(EF_POLICY_VARIANTS)


def test_cut_study_and_matrix(out, tmp_path):
    from bench.studies.efpolicy import cell_name, policy_matrix, policy_matrix_markdown, write_policy_matrix
    full = load_policy_study(out)
    cut = load_policy_study(out, rounds=2)
    assert cut.rounds == 2 and full.rounds == 4
    for lab in full.multi.labels:
        for a, b in zip(full.multi.runs[lab], cut.multi.runs[lab]):
            assert b.rounds == a.rounds[:2] and b.config.rounds == 2
            assert b.final_accuracy == a.rounds[1]["test_accuracy"]
    assert [r["per_seed"] for r in policy_rows(cut)] == [
        [run.rounds[1]["test_accuracy"] for run in full.multi.runs[lab]] for lab in full.multi.labels]
    with pytest.raises(ValueError, match="rounds must be in"):
        load_policy_study(out, rounds=5)
    assert cell_name(full) == "IID, lr 0.1, 4 rounds" and cell_name(cut) == "IID, lr 0.1, 2 rounds"
    mat = policy_matrix([cut, full])
    assert [c["cell"] for c in mat] == [cell_name(cut), cell_name(full)]
    assert mat[1]["rows"]["dgp drop"] == {r["label"]: r for r in policy_rows(full)}["dgp drop"]
    md = policy_matrix_markdown([cut, full])
    acc = mat[0]["rows"]["dgp full"]["accuracy"]
    assert f"| {cell_name(cut)} | 2 | " in md and f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}" in md
    paths = write_policy_matrix([cut, full], str(tmp_path), extra={"machine": "test"})
    for p in paths.values():
        assert os.path.getsize(p) > 0
    with pytest.raises(ValueError, match="at least one"):
        write_policy_matrix([], str(tmp_path))
