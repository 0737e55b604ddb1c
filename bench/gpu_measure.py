"""Everything a GPU machine should measure for the Triton backend, in one call (< 8 minutes).

    OUT=/tmp/out bash bench/gpu_measure.sh          # build, then this script
    python bench/gpu_measure.py --out /tmp/out      # (the C++ extension built already)
    python bench/gpu_measure.py --cpu-smoke --out /tmp/smoke   # the logic, interpreter

Writes into ``--out`` (each step time-boxed, so a failure never hides the others):

* ``tests.log``: the CUDA tests of ``tests/kernels`` (bit-exact vs the reference on the GPU);
* ``bench.md``: the benchmark table (``dgp_kernels.benchmarks_gpu``): 25M float32, the
  ResNet-18 and ResNet-50 gradient lists, ours eager and with CUDA-graph replay, the
  authors' operator, ``torch.topk`` and ``clone`` in the same process, with device,
  versions and SM clock;
* ``profile.txt``: per call of the default path, the device launches the profiler saw
  (kernels, memsets, copies) against the launcher's own count, the kernels' device times,
  and the host synchronisations, for the 25M tensor and the ResNet-18 list;
* ``codec.json``: the device codec (``bench/bench_gpu_codec.py``): encode, decode-accumulate
  of 8 clients, a ResNet-18 DDP step (world size 1, NCCL) with and without the hook, each
  with its exactness check;
* ``sweep.csv`` / ``sweep.txt``: one ``Tuning`` field at a time around the default, each
  setting checked bit for bit against the reference and timed (CUDA-event medians);
  the fastest exact setting per field is what to pick the default from;
* ``summary.txt``: the lines to copy into the notes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SWEEP = {  # field -> values tried (the default is always among them)
    "block": [512, 1024, 2048],
    "num_warps": [4, 8, 16],
    "sample": [4096, 16384, 65536],
    "sample_split": [4, 8, 32],
    "fine_bits": [0, 2, 3, 4],
    "cand_chunk_tiles": [1, 4, 16],
    "lookback": [16, 32, 64],
    "tail_min": [4096, 16384, 65536],
}


def _log(out, name, text):
    with open(os.path.join(out, name), "a") as f:
        f.write(text)
    print(text, end="", flush=True)


def _inputs(device, smoke):
    from dgp_kernels.benchmarks_gpu import resnet18_shapes

    gen = torch.Generator(device=device).manual_seed(0)
    if smoke:
        shapes = {"tensor": [(6000,)], "resnet18": [(40, 30), (7,), (0,), (500,)]}
    else:
        shapes = {"tensor 25M": [(25_000_000,)], "resnet18": resnet18_shapes()[0]}
    return {k: [torch.randn(s, device=device, generator=gen) for s in v] for k, v in shapes.items()}


def _time(fn, reps, device):
    times = []
    for _ in range(reps + 2):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times = sorted(times[2:])
    return times[len(times) // 2]


def _exact(gs, tuning):
    from dgp_kernels.kernels.triton import select_ef_multi_triton
    from dgp_kernels.ops import reference

    es = [torch.randn_like(g) * 0.1 for g in gs]
    es_ref = [e.clone() for e in es]
    got = select_ef_multi_triton(gs, es, tuning=tuning)
    want = reference.select_ef_multi(gs, es_ref)
    ints = lambda t: t.view(torch.int32) if t.is_floating_point() else t  # noqa: E731
    return (all(torch.equal(ints(a), ints(b)) for a, b in zip(got, want))
            and all(torch.equal(ints(a), ints(b)) for a, b in zip(es, es_ref)))


def step_tests(out, budget):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "tests/kernels", "tests/ops/test_select_compile.py"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
        text = proc.stdout[-6000:] + proc.stderr[-2000:] + f"\nrc={proc.returncode}\n"
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"")[-6000:].decode(errors="replace") + f"\nTIMEOUT after {budget} s\n"
    _log(out, "tests.log", text)
    return text.strip().splitlines()[-2:]


def step_bench(out, smoke):
    from dgp_kernels import benchmarks_gpu

    args = ["--markdown", os.path.join(out, "bench.md")]
    args += ["--cpu-smoke", "--size", "3000", "--reps", "2", "--warmup", "1"] if smoke else ["--reps", "20"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        benchmarks_gpu.main(args)
    _log(out, "bench.log", buf.getvalue())
    return [ln for ln in buf.getvalue().splitlines() if "/ours" in ln]


def step_profile(out, device, smoke):
    from dgp_kernels.kernels.triton import CallInfo, cuda_graphs, select_ef_multi_triton

    lines = []
    for label, gs in _inputs(device, smoke).items():
        es = [torch.zeros_like(g) for g in gs]
        info = CallInfo()
        select_ef_multi_triton(gs, es, info=info)  # compile, and the launcher's own count
        if device != "cuda":
            lines.append(f"{label}: launcher count {len(info.launches)} {info.launches} "
                         f"syncs {info.syncs} (no CUDA profiler on CPU)")
            continue
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            select_ef_multi_triton(gs, es)
            torch.cuda.synchronize()
        dev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e.name for e in dev]
        syncs = sum(1 for e in prof.events() if "Synchronize" in e.name or "MemcpyDtoH" in e.name
                    or "item" in e.name or "tolist" in e.name)
        total = sum(e.device_time for e in dev) / 1e3
        lines.append(f"{label}: profiler saw {len(dev)} device launches (launcher: "
                     f"{len(info.launches)} + transfers), device time {total:.3f} ms, "
                     f"host reads ~{syncs}")
        for e in dev:
            lines.append(f"    {e.name[:60]:<60} {e.device_time / 1e3:.4f} ms")
        with cuda_graphs():
            for _ in range(3):
                gi = CallInfo()
                select_ef_multi_triton(gs, es, info=gi)
        lines.append(f"{label}: with cuda_graphs(): replayed={gi.replayed}")
        del kernels
    _log(out, "profile.txt", "\n".join(lines) + "\n")
    return lines[:1]


def step_codec(out, smoke):
    import json

    from bench.bench_gpu_codec import gpu_codec_rows

    result = gpu_codec_rows(smoke=smoke, repeat=2 if smoke else 20)
    _log(out, "codec.json", json.dumps(result, indent=1, default=str) + "\n")
    return [str(r)[:200] for r in result["rows"]]


def step_sweep(out, device, smoke, budget):
    from dgp_kernels.kernels.triton import DEFAULT, select_ef_multi_triton

    t_end = time.time() + budget
    inputs = _inputs(device, smoke)
    rows = ["field,value,input,median_ms,exact"]
    best = []
    for field, values in SWEEP.items():
        results = []
        for value in values:
            if time.time() > t_end:
                break
            tuning = DEFAULT.replace(**{field: value})
            for label, gs in inputs.items():
                es = [torch.zeros_like(g) for g in gs]
                ok = _exact(gs, tuning)
                ms = _time(lambda: select_ef_multi_triton(gs, es, tuning=tuning),
                           2 if smoke else 10, device)
                rows.append(f"{field},{value},{label},{ms:.4f},{ok}")
                results.append((label, ms, value, ok))
        for label in inputs:
            mine = [r for r in results if r[0] == label and r[3]]
            if mine:
                ms, value = min((r[1], r[2]) for r in mine)
                dflt = [r[1] for r in mine if r[2] == getattr(DEFAULT, field)]
                best.append(f"{field:<18} {label:<12} fastest exact {value!s:>6}: {ms:.4f} ms "
                            f"(default {getattr(DEFAULT, field)}: "
                            f"{dflt[0] if dflt else float('nan'):.4f} ms)")
        if any(not r[3] for r in results):
            best.append(f"{field}: NOT BIT-EXACT at {[r[2] for r in results if not r[3]]}")
    _log(out, "sweep.csv", "\n".join(rows) + "\n")
    _log(out, "sweep.txt", "\n".join(best) + "\n")
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_out"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the logic on tiny CPU tensors under the interpreter (no GPU)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--tests-budget", type=int, default=170, help="seconds for the CUDA tests")
    p.add_argument("--sweep-budget", type=int, default=120, help="seconds for the sweep")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    smoke = args.cpu_smoke
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("gpu_measure: no CUDA device (use --cpu-smoke to check the logic)")
        return 2
    device = "cpu" if smoke else "cuda"
    t0 = time.time()
    summary = []
    if not args.skip_tests and not smoke:
        summary += ["tests: " + " | ".join(step_tests(args.out, args.tests_budget))]
    summary += ["bench: " + s for s in step_bench(args.out, smoke)]
    summary += ["profile: " + s for s in step_profile(args.out, device, smoke)]
    try:
        summary += ["codec: " + s for s in step_codec(args.out, smoke)]
    except Exception as exc:  # (a failure here must not hide the sweep)
        summary.append(f"codec: FAILED {type(exc).__name__}: {exc}")
    summary += ["sweep: " + s for s in step_sweep(args.out, device, smoke, args.sweep_budget)]
    summary.append(f"total {time.time() - t0:.0f} s")
    _log(args.out, "summary.txt", "\n".join(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
