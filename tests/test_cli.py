"""`dgp` command line: `dgp bench` runs end to end on tiny inputs; bad options fail clearly."""

import json
import os
import subprocess
import sys

import pytest

from dgp_kernels import speed as benchmarks
from dgp_kernels.cli import main

TINY = ["bench", "--quick", "--size", "2000", "--model", "lenet_sigmoid", "--threads", "1",
        "--repeats", "2"]


def test_bench_prints_table(capsys, tmp_path):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    args = TINY[:-4] + ["--repeats", "2", "--threads", "1,2"]  # TINY without its threads
    assert main(args + ["--json", str(js), "--markdown", str(md)]) == 0
    out = capsys.readouterr()
    text = out.out
    for needle in ("machine", "torch", "backend", "OMP_WAIT_POLICY", "load average",
                   "lenet_sigmoid gradients: real", "one float32 tensor of 2,000 elements",
                   "ours select_ef_multi", "ours select_multi", "authors 2x topk+scatter, EF",
                   "single topk per layer", "clone", "ours_ef / clone", "authors_ef / ours_ef"):
        assert needle in text, needle
    assert "[dgp bench]" in out.err  # progress lines go to stderr
    assert "bar <=" not in text and "bar >=" not in text  # measurements, not verdicts
    data = json.loads(js.read_text())
    assert len(data["cases"]) == 4  # 2 inputs x 2 thread counts
    assert {c["threads"] for c in data["cases"]} == {1, 2}
    for c in data["cases"]:
        keys = [t["key"] for t in c["timings"]]
        assert keys == ["ours_ef", "ours", "ours_layer", "authors_ef", "topk", "clone", "copy"]
        assert all(len(t["times_ms"]) == 2 for t in c["timings"])
    assert "| threads | method |" in md.read_text()


def test_bench_random_grads_and_no_big_tensor(capsys):
    assert main(["bench", "--repeats", "1", "--warmup", "0", "--size", "0", "--threads", "1",
                 "--model", "convnet_small", "--grads", "random"]) == 0
    text = capsys.readouterr().out
    assert "convnet_small gradients: random" in text
    assert "float32 tensor of" not in text


def test_residual_state_is_reset_between_repeats():
    """Every repetition of the EF methods starts from a zero residual (same work each time)."""
    import torch

    gs = [torch.randn(50), torch.randn(7, 3)]
    methods = benchmarks._methods(gs, 0.05, 0.2)
    ef = next(m for m in methods if m.key == "ours_ef")
    outs = []
    for _ in range(3):
        ef.reset()
        outs.append(ef.fn())
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "--threads", "0"], "positive thread counts"),
        (["bench", "--threads", "one"], "positive thread counts"),
        (["bench", "--size", "-5"], "integer >= 0"),
        (["bench", "--repeats", "0"], "integer >= 1"),
        (["bench", "--model", "vgg"], "invalid choice: 'vgg'"),
        (["bench", "--grads", "fake"], "invalid choice: 'fake'"),
        (["bench", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_options(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_output_directory_fails_before_running(capsys, tmp_path):
    bad = str(tmp_path / "no" / "such" / "r.json")
    assert main(TINY + ["--json", bad]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "does not exist" in err


@pytest.mark.no_cuda
def test_bench_gpu_on_without_cuda_fails_clearly(capsys):
    assert main(TINY + ["--gpu", "on"]) == 2
    assert "--gpu on" in capsys.readouterr().err


def test_gpu_benchmark_logic_on_cpu_tensors(capsys):
    """The GPU benchmark's table, exactness check and ratios on small CPU tensors (its
    --cpu-smoke mode; the real run needs CUDA and skips without it)."""
    from dgp_kernels import benchmarks_gpu

    assert benchmarks_gpu.main(["--cpu-smoke", "--size", "3000", "--reps", "2", "--warmup", "1",
                                "--variant", "b512:block=512,num_warps=4"]) == 0
    text = capsys.readouterr().out
    assert "bit-exact vs the reference (same device): yes" in text
    assert "sampled path: 0 layer misses in 5 calls" in text
    for needle in ("ours_ef", "authors_ef", "topk", "clone", "authors_ef/ours_ef", "| of peak |",
                   "ours_ef[b512]", "authors_ef/ours_ef[b512]", "ours_ef[graphs]",
                   "variant b512: ours with Tuning(block=512, num_warps=4)"):
        assert needle in text, needle
    with pytest.raises(SystemExit, match="not a field of Tuning"):
        benchmarks_gpu.main(["--cpu-smoke", "--size", "300", "--variant", "x:no_such_field=1"])


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_module_entry_point_subprocess():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "dgp_kernels.cli"] + TINY,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ours_ef / clone" in proc.stdout


# --------------------------------------------------------------------------------------
# The command family: defaults in --help, output folders checked before any work
# --------------------------------------------------------------------------------------
def _subparsers():
    import argparse

    from dgp_kernels.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["train", "evaluate", "bench"])
def test_help_states_every_default(command):
    """Every option that has a default says it in its help text."""
    import argparse

    p = _subparsers()[command]
    checked = 0
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        assert a.help, f"dgp {command} {a.option_strings}: no help"
        if a.default is None and command != "bench" and "default" not in a.help:
            # no default value: the help must still say what happens without the option
            # (bench's only such options are --json/--markdown: "also write ...")
            pytest.fail(f"dgp {command} {a.option_strings}: help does not say the default")
        if a.default not in (None, False):
            assert "default" in a.help, f"dgp {command} {a.option_strings}: {a.help!r}"
        checked += 1
    assert checked >= 5
    text = p.format_help()
    assert "%(default)" not in text


def test_help_shows_train_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--clients CLIENTS number of clients (default: 10)", "(default: 150)",
                   "learning rate (default: 0.1)", "local batch size (default: 32)",
                   "compressors (default: 0)", "(default: none dgp)", "dgp:top=0.02,keep=0.1"):
        assert needle in text, needle


def test_evaluate_unwritable_out_fails_before_running(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "run"
    assert main(["evaluate", "--quick", "--no-progress", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot create the folder" in err


def test_evaluate_bad_defense_leaves_no_folder(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["evaluate", "--quick", "--no-progress", "--defenses", "none,dgp:top",
                 "--out", str(out)]) == 2
    assert "expected param=value pairs" in capsys.readouterr().err
    assert not out.exists()


def test_prepare_out_dir(tmp_path):
    from dgp_kernels.cli import default_out_dir, prepare_out_dir

    target = tmp_path / "a" / "b"
    assert prepare_out_dir(str(target)) == str(target) and target.is_dir()
    assert prepare_out_dir(str(target)) == str(target)  # an existing folder is fine
    assert default_out_dir("train").startswith(os.path.join("runs", "train-"))
