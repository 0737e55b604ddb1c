"""`dgp evaluate`: runs end to end on a tiny grid, writes the report, fails clearly on bad options."""

import json
import os

import pytest

from dgp_kernels.attacks import cli as eval_cli
from dgp_kernels.attacks import runner
from dgp_kernels.cli import main

# One 8x8 photo, 0.5% of the default attack steps, no simulator: seconds, with the real attack code.
TINY = ["evaluate", "--image-size", "8", "--images", "1", "--iterations", "0.005", "--no-utility",
        "--no-progress", "--device", "cpu"]


@pytest.fixture
def tiny_budgets(monkeypatch):
    """L-BFGS steps of 4 evaluations instead of 20 (the scale flag only changes step counts)."""
    budgets = {k: dict(v) for k, v in runner.ATTACK_BUDGETS.items()}
    for name in ("dlg", "idlg", "dlg-adaptive"):
        budgets[name]["max_iter"] = 4
    monkeypatch.setattr(runner, "ATTACK_BUDGETS", budgets)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--defenses", "--attacks", "--images", "--dataset", "--data-root",
                 "--iterations", "--quick", "--full", "--device", "--seed", "--no-utility", "--threads",
                 "--workers", "--suite", "--no-tuning"):
        assert flag in text, flag
    assert "dgp:top=0.05,keep=0.2" in text


def test_module_import_is_light():
    # cli.py must not pull torch-heavy or optional modules at import time
    src = open(eval_cli.__file__).read().split('"""', 2)[2]
    header = src.split("def add_arguments")[0]
    for mod in ("torch", "matplotlib", "skimage", "tqdm", "sklearn"):
        assert f"import {mod}" not in header


def test_evaluate_end_to_end(tmp_path, capsys, tiny_budgets):
    out = tmp_path / "run"
    rc = main(TINY + ["--defenses", "none", "dgp", "--attacks", "dlg,ig-adaptive", "rtf", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in text
    assert "most often best" in text and "dgp:top=0.05,keep=0.2" in text
    data = json.loads((out / "results.json").read_text())
    assert {(r["defense"], r["attack"]) for r in data["attacks"]} == {
        (d, a) for d in ("none", "dgp:top=0.05,keep=0.2") for a in ("dlg", "ig-adaptive", "rtf")}
    assert data["config"]["attack_params"]["ig-adaptive"]["iterations"] == max(
        1, round(runner.ATTACK_BUDGETS["ig-adaptive"]["iterations"] * 0.005))
    assert data["utility"] is None
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["grid_00_astronaut.png", "privacy_utility.png"]
    md = (out / "report.md").read_text()
    assert "not measured" in md and "(--no-utility)" in md


def test_digits_dataset(tmp_path, capsys, tiny_budgets):
    rc = main(TINY[:1] + ["--dataset", "digits", "--images", "2", "--iterations", "0.005", "--no-utility",
                          "--no-progress", "--defenses", "topk", "--attacks", "idlg", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["targets"]["shape"] == [2, 1, 8, 8]
    assert data["targets"]["source"] == "digits"
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--defenses", "dgp:top=2"], "top must be in [0, 1]"),
        (["--defenses", "lolz"], "unknown defense 'lolz'"),
        (["--attacks", "dlg", "nope"], "unknown attack 'nope'"),
        (["--iterations", "-1"], "iterations scale must be"),
        (["--images", "0"], "images must be an int >= 1"),
        (["--dataset", "mnist", "--data-root", "/nonexistent-dgp-test-dir"], "mnist"),
        (["--device", "toaster"], "device must be 'auto' or a torch device string"),
    ],
)
def test_bad_options_exit_2_with_a_message(extra, message, capsys, tmp_path):
    rc = main(TINY + ["--out", str(tmp_path)] + extra)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("dgp evaluate: error:") and message in err


def test_quick_and_full_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--quick", "--full"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.no_cuda
def test_cuda_requested_without_cuda(capsys, tmp_path):
    assert main(TINY[:-2] + ["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
