"""`dgp train`: writes JSON/CSV per defense, the summary and the PNG plots; bad options exit 2
with a message naming the flag, before the output folder is made; defense specs; defaults
agree with SimConfig."""

import argparse
import csv
import json
import subprocess
import sys

import pytest

from dgp_kernels.cli import main
from dgp_kernels.sim import SimConfig, SimResult
from dgp_kernels.sim import cli as simcli
from dgp_kernels.sim.config import parse_defenses, parse_value

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_train_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--defenses", "none,dgp:keep=0.3", "topk", "--model", "mlp",
               "--clients", "3", "--rounds", "3", "--threads", "1", "--no-progress",
               "--out", str(out), "--eval-every", "2"])
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
    (["--defenses", "none,soteria"], "--defenses must be one of"),
    (["--defenses", "dgp:top"], "expected param=value pairs"),
    (["--defenses", "top=0.1"], "no defense name"),
    (["--defenses", "dgp:top=0.9,keep=0.5"], "--defenses 'dgp:top=0.9,keep=0.5': "),
    (["--defenses", "dgp:topp=0.1"], "--defenses 'dgp:topp=0.1': "),
    (["--clients", "0"], "--clients must be an int >= 1, got 0"),
    (["--rounds", "0"], "--rounds must be an int >= 1, got 0"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--participation", "1.5"], "--participation must be"),
    (["--model", "vgg"], "--model must be one of"),
    (["--lr-steps", "10-0.1"], "ROUND:LR"),
    (["--lr-steps", "10:-1"], "--lr-steps[0] lr must be"),
    (["--dataset", "cifar10"], "needs root="),
    (["--defenses", "dgp,dgp:top=0.1"], "twice"),
    (["--seeds", "0,0"], "--seeds"),
    (["--defenses", "dgp:top_feedback=half"], "top_feedback must be one of full, clipped, floor, drop"),
    (["--defenses", "dgp:dense_below=-3"], "dense_below must be an int >= 0"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    rc = main(["train", "--rounds", "1", "--no-progress", "--no-plots", "--out", str(out)] + argv)
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "SimConfig" not in err, err
    if "--dataset" not in argv:  # bad options are found before the output folder is made
        assert not out.exists()


@pytest.mark.parametrize("policy", ["clipped", "floor"])
def test_train_top_feedback_from_the_command_line(tmp_path, capsys, policy):
    out = tmp_path / "run"
    rc = main(["train", "--defenses", f"dgp:top_feedback={policy}", "--model", "mlp",
               "--clients", "2", "--rounds", "2", "--threads", "1", "--no-progress",
               "--no-plots", "--diagnostics", "--out", str(out)])
    assert rc == 0 and f"top_feedback={policy}" in capsys.readouterr().out
    res = json.loads((out / "dgp.json").read_text())
    assert res["config"]["defense_params"] == {"top_feedback": policy}
    assert all(r["top_dropped_l1"] > 0 for r in res["rounds"])


def test_unwritable_out_fails_before_running(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "run"  # a folder under a regular file cannot be created
    assert main(["train", "--rounds", "1", "--no-progress", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot create the folder" in err
    assert main(["train", "--rounds", "1", "--no-progress", "--out",
                 str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_parse_defenses():
    got = parse_defenses(["none,dgp:top=0.02,error_feedback=false,value_dtype=bfloat16",
                          "qsgd:levels=15", "dp:seed=none"])
    assert got == [("none", {}),
                   ("dgp", {"top": 0.02, "error_feedback": False, "value_dtype": "bfloat16"}),
                   ("qsgd", {"levels": 15}), ("dp", {"seed": None})]
    assert parse_value("1e-3") == 1e-3 and parse_value("TRUE") is True and parse_value("x y") == "x y"
    with pytest.raises(ValueError, match="--defenses is empty"):
        parse_defenses([], "--defenses")


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
