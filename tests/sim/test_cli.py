"""`dgp train`: writes JSON/CSV per defense, the summary and the PNG plots; bad options exit 2
with a message naming them; parameter parsing; defaults agree with SimConfig."""

import argparse
import csv
import json
import subprocess
import sys

import pytest

from dgp_kernels.cli import main
from dgp_kernels.sim import SimConfig, SimResult
from dgp_kernels.sim import cli as simcli
from dgp_kernels.sim.config import parse_defense_params, parse_value

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_train_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--defenses", "none,dgp,topk", "--model", "mlp", "--clients", "3",
               "--rounds", "3", "--threads", "1", "--no-progress", "--out", str(out),
               "--defense-param", "dgp.keep=0.3", "--eval-every", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| defense |" in text and "keep=0.3" in text
    for d in ("none", "dgp", "topk"):
        res = json.loads((out / f"{d}.json").read_text())
        assert res["config"]["defense"] == d and len(res["rounds"]) == 3
        assert res["total_upload_bytes"] == sum(r["upload_bytes"] for r in res["rounds"])
        rows = list(csv.DictReader((out / f"{d}.csv").open()))
        assert [int(r["round"]) for r in rows] == [0, 1, 2]
        assert rows[0]["test_accuracy"] == ""  # not evaluated (eval_every=2)
        assert 0.0 <= float(rows[2]["test_accuracy"]) <= 1.0
        cum = 0
        for r in rows:
            cum += int(r["upload_bytes"])
            assert int(r["cumulative_upload_bytes"]) == cum
        assert SimResult.from_json(str(out / f"{d}.json")).final_accuracy == res["final_accuracy"]
    dgp = json.loads((out / "dgp.json").read_text())
    assert dgp["config"]["defense_params"] == {"keep": 0.3}
    summary = json.loads((out / "summary.json").read_text())
    assert [r["defense"] for r in summary] == ["none", "dgp", "topk"]
    assert summary[0]["upload_vs_first"] == 1.0 and summary[1]["upload_vs_first"] < 0.5
    for png in ("accuracy_vs_round.png", "accuracy_vs_upload.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


@pytest.mark.parametrize("argv,match", [
    (["--defenses", "none,soteria"], "SimConfig.defense must be one of"),
    (["--defense-param", "dgp.top"], "DEFENSE.PARAM=VALUE"),
    (["--defense-param", "dp.clip=1"], "not among the defenses"),
    (["--defenses", "dgp", "--defense-param", "dgp.top=0.9", "--defense-param", "dgp.keep=0.5"],
     "defense 'dgp'"),
    (["--clients", "0"], "SimConfig.clients"),
    (["--lr-steps", "10-0.1"], "ROUND:LR"),
    (["--dataset", "cifar10"], "needs root="),
    (["--defenses", "dgp,dgp"], "twice"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, match):
    rc = main(["train", "--rounds", "1", "--no-progress", "--no-plots", "--out", str(tmp_path)] + argv)
    assert rc == 2
    assert match in capsys.readouterr().err


def test_parse_defense_params():
    got = parse_defense_params(["dgp.top=0.02", "dgp.error_feedback=false",
                                "dgp.value_dtype=bfloat16", "qsgd.levels=15", "dp.seed=none"],
                               ["dgp", "qsgd", "dp", "none"])
    assert got == {"dgp": {"top": 0.02, "error_feedback": False, "value_dtype": "bfloat16"},
                   "qsgd": {"levels": 15}, "dp": {"seed": None}, "none": {}}
    assert parse_value("1e-3") == 1e-3 and parse_value("TRUE") is True and parse_value("x y") == "x y"


def test_cli_defaults_match_simconfig():
    p = argparse.ArgumentParser()
    simcli.add_arguments(p)
    args = p.parse_args([])
    cfg = SimConfig()
    for key in simcli._DEFAULTS:
        assert getattr(args, key) == getattr(cfg, key), key


def test_import_stays_light():
    # (torch itself may import tqdm: count only what importing the simulator adds)
    code = ("import sys, dgp_kernels; before = set(sys.modules); "
            "import dgp_kernels.sim, dgp_kernels.sim.cli; "
            "print(sorted(m for m in ('sklearn', 'matplotlib', 'tqdm', 'numpy.testing') "
            "if m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
