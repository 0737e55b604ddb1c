"""`dgp bench`'s steady-state rows and size sweep (dgp_kernels.speed) on tiny inputs: they
run, check what they time, and report every method. Timings are never asserted."""

from __future__ import annotations

import dataclasses

import torch

import dgp_kernels
from dgp_kernels import speed
from dgp_kernels.cli import main


def test_steady_state_runs_both_chains_bit_equal():
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(40_000, generator=gen), torch.randn(30, 20, generator=gen)]
    st = speed.steady_state(gs, steps=8, threads=1, skipped=3)
    assert len(st.plain_ms) == len(st.hint_ms) == len(st.copy_ms) == 8
    assert all(t > 0 for t in st.plain_ms + st.hint_ms + st.copy_ms)
    med, mn = st.stats("hint_ms")
    assert mn <= med
    if dgp_kernels.backend_info().cpu == "cpp":  # 5 counted steps of the one hinted-size layer
        assert st.hint_layers + st.hint_misses == 5
    else:
        assert st.hint_layers == -1


def test_steady_state_bfloat16():
    gs = [torch.randn(50_000).to(torch.bfloat16)]
    st = speed.steady_state(gs, steps=4, threads=1, skipped=1)
    assert len(st.hint_ms) == 4


def test_size_sweep_rows():
    rows = speed.size_sweep([10, 2000], ["float32", "bfloat16"], [1], rounds=1, batch_us=50)
    assert [(r["dtype"], r["n"]) for r in rows] == [("float32", 10), ("float32", 2000),
                                                   ("bfloat16", 10), ("bfloat16", 2000)]
    for r in rows:
        for m in ("select", "select_ef", "topk", "partition", "copy"):
            assert r[f"{m}_us"] > 0 and r[f"{m}_min_us"] <= r[f"{m}_us"]


def test_dgp_bench_with_sweep_and_steady_state(capsys, tmp_path):
    md = tmp_path / "r.md"
    assert main(["bench", "--repeats", "1", "--warmup", "0", "--size", "0", "--threads", "1",
                 "--model", "lenet_sigmoid", "--grads", "random", "--steady-steps", "7",
                 "--sweep", "--sweep-max", "100", "--sweep-dtypes", "float32",
                 "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "steady state: 7 consecutive error-feedback steps" in out
    assert "hint / copy_" in out
    assert "size sweep" in out and "n=        100" in out
    text = md.read_text()
    assert "| 1 | float32 | 100 |" in text and "hint / copy_" in text


def test_steady_state_settled_half_and_plot(capsys, tmp_path):
    png = tmp_path / "steady.png"
    assert main(["bench", "--repeats", "1", "--warmup", "0", "--size", "0", "--threads", "1",
                 "--model", "lenet_sigmoid", "--grads", "random", "--steady-steps", "12",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "steps 7-12 alone: hint / copy_" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_steady_state_settled_half_statistics():
    st = speed.SteadyStateResult(threads=1, steps=50, skipped=5, alpha=0.9, plain_ms=[1.0] * 50,
                                 hint_ms=list(range(50)), copy_ms=[1.0] * 50, hint_layers=-1,
                                 hint_misses=-1)
    assert st.stats("hint_ms") == (27.0, 5)  # steps 6-50
    assert st.settled == 25 and st.stats("hint_ms", st.settled) == (37.0, 25)  # steps 26-50
    short = dataclasses.replace(st, steps=8, skipped=5)
    assert short.settled == 5  # never before the skipped steps


def test_dgp_bench_plot_needs_steady_rows(capsys, tmp_path):
    png = tmp_path / "none.png"
    assert main(["bench", "--repeats", "1", "--warmup", "0", "--size", "0", "--threads", "1",
                 "--model", "lenet_sigmoid", "--grads", "random", "--steady-steps", "0",
                 "--plot", str(png)]) == 0
    assert "no steady-state rows" in capsys.readouterr().err and not png.exists()
    assert main(["bench", "--plot", str(tmp_path / "nodir" / "x.png")]) == 2


def test_dgp_bench_steady_state_off_and_bad_sweep_dtype(capsys):
    assert main(["bench", "--repeats", "1", "--warmup", "0", "--size", "0", "--threads", "1",
                 "--model", "lenet_sigmoid", "--grads", "random", "--steady-steps", "0"]) == 0
    assert "steady state" not in capsys.readouterr().out
    try:
        main(["bench", "--sweep-dtypes", "int8"])
    except SystemExit as e:
        assert e.code == 2
    assert "expected a comma-separated list of float32" in capsys.readouterr().err
