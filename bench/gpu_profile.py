"""Where the GPU time of one band selection goes, and which launch sizes are fastest.

    python bench/gpu_profile.py                     # 25M float32 with error feedback
    python bench/gpu_profile.py --size 25000000 --reps 20 --json out.json

Companion of ``bench/bench_triton.py`` (which gives the headline numbers against the
authors' operator) for one lent GPU session. Three parts, all on one input (``randn``,
error feedback on, top=0.05, keep=0.20):

1. copy ceiling: ``clone()`` of a 2 GiB buffer, bytes read + written over the CUDA-event
   median (the device's attainable bandwidth, next to the nominal peak);
2. per-kernel time of one call from ``torch.profiler`` (CUDA activity), summed by kernel
   name, plus the host-side wall time of the call: which phase to work on next;
3. a sweep of the module constants of :mod:`dgp_kernels.kernels.triton.select`
   (``--knobs``: ``BLOCK``, ``NUM_WARPS``, ``SCAN_WARPS``, ``SCAN_TILE``, ``CAND_CHUNK``,
   ``SAMPLE_SPLIT``, ``FUSE_TAILS``, ``USE_CUDA_GRAPHS``, ``WRITE_MAXNREG``, ...; one knob
   at a time, or
   several together as ``A:B=a1:b1,a2:b2``): per setting the CUDA-event median of a call
   and the device time of its kernels (``torch.profiler``; a host-bound call hides kernel
   gains in the event time), each checked bit for bit against the default configuration's
   indices, values and residual (a faster wrong kernel is not a result); the default is
   also checked against the C++ CPU kernel when it is built.

Skips (exit 0) without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List

import torch

TOP, KEEP = 0.05, 0.20
DEFAULT_KNOBS = ("FUSE_TAILS=0,1;USE_CUDA_GRAPHS=0,1;FUSE_TAILS:USE_CUDA_GRAPHS=1:1;"
                 "COMPACT_CANDIDATES=0,1;FINE_BITS=0,2,3,4;SAMPLE=8192,16384,65536;"
                 "BLOCK:NUM_WARPS=1024:4,1024:8,2048:4,2048:8,2048:16;"
                 "PERSISTENT:PIPELINE_STAGES=1:2,1:3,2:2,2:3,4:2;"
                 "PERSISTENT:BLOCK=2:1024,3:1024,4:1024;"
                 "PERSISTENT:WRITE_MAXNREG:GATHER_MAXNREG=2:128:128,3:80:80;"
                 "WRITE_MAXNREG=64,72,80,96;GATHER_MAXNREG=56,64;"
                 "FUSE_TAILS:PERSISTENT:BLOCK:USE_CUDA_GRAPHS=1:3:1024:1;"
                 "SUPER=16,64,256;CAND_CHUNK=4096,8192,32768;SAMPLE_SPLIT=4,8,32;"
                 "SCAN_WARPS=4,8;SCAN_TILE=256,1024;FUSED_SCAN_TILE=128,512")


def _parse_knobs(text: str):
    """``'A=1,2;B:C=3:4,5:6'`` -> ``[(('A',), [(1,), (2,)]), (('B', 'C'), [(3, 4), (5, 6)])]``
    (ints; 0/1 for booleans): each entry is swept on its own, the names of one entry
    together."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        names, _, values = part.partition("=")
        names = tuple(n.strip() for n in names.split(":"))
        settings = [tuple(int(x) for x in v.split(":")) for v in values.split(",") if v]
        if not settings or any(len(v) != len(names) for v in settings):
            raise SystemExit(f"gpu_profile: --knobs entry {part!r} is not NAME[:NAME]=v1[:w1],...")
        out.append((names, settings))
    return out


def _kernel_ms(fn, calls: int = 5, before=None) -> Dict[str, float]:
    """Device ms per call of each CUDA kernel ``fn`` launches (``torch.profiler``; the
    ``before`` work, e.g. a residual reset, is excluded by name)."""
    from torch.profiler import ProfilerActivity, profile

    if before is not None:
        before()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
            if before is not None:
                before()
        torch.cuda.synchronize()
    per_kernel: Dict[str, float] = {}
    for ev in prof.key_averages():
        dt = getattr(ev, "device_time_total", None)
        if dt is None:
            dt = getattr(ev, "cuda_time_total", 0.0)
        if dt and ev.key and not ev.key.startswith(("aten::", "cuda", "Memcpy", "Memset",
                                                      "ProfilerStep", "dgp::")):
            per_kernel[ev.key] = dt / calls / 1e3  # ms per call
    return per_kernel


def _dgp_total(per_kernel: Dict[str, float]) -> float:
    """The dgp kernels' part (the residual reset shows as elementwise/copy kernels)."""
    return sum(v for kname, v in per_kernel.items() if "copy" not in kname.lower()
               and "elementwise" not in kname.lower())


def _events_ms(fn, reps: int, warmup: int = 3, before=None) -> List[float]:
    out = []
    for i in range(warmup + reps):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        if i >= warmup:
            out.append(a.elapsed_time(b))
    return out


def _median(xs: List[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def copy_ceiling(reps: int) -> float:
    """Bytes/s of a 2 GiB device-to-device clone (read + write counted)."""
    x = torch.empty(1 << 29, dtype=torch.float32, device="cuda").normal_()
    ms = _median(_events_ms(lambda: x.clone(), reps))
    del x
    torch.cuda.empty_cache()
    return 2 * (1 << 29) * 4 / (ms * 1e-3)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.detach().cpu().contiguous().view(ints[t.dtype]) if t.is_floating_point() else t.cpu()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=25_000_000)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--knobs", default=DEFAULT_KNOBS,
                   help="one-at-a-time sweep of module constants of "
                        "dgp_kernels.kernels.triton.select, 'NAME=v1,v2;NAME=...' "
                        f"(default: {DEFAULT_KNOBS!r}; USE_CUDA_GRAPHS=0,1 also works)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: skipped, no CUDA device")
        return 0
    import dgp_kernels
    from dgp_kernels.kernels.triton import select as ts

    dev = torch.cuda.get_device_name()
    info = dgp_kernels.backend_info()
    print(f"# gpu_profile: {dev} | torch {torch.__version__} | CUDA backend {info.cuda} | "
          f"CPU backend {info.cpu}")
    report: Dict[str, object] = {"device": dev, "size": args.size}

    bw = copy_ceiling(args.reps)
    report["copy_bytes_per_s"] = bw
    print(f"# copy ceiling (2 GiB clone, read+write): {bw / 1e12:.2f} TB/s")

    gen = torch.Generator(device="cuda").manual_seed(0)
    g = torch.randn(args.size, device="cuda", generator=gen)
    e0 = torch.randn(args.size, device="cuda", generator=gen) * 0.1
    e = e0.clone()
    n = args.size
    k = dgp_kernels.band_counts(n, TOP, KEEP)[1]
    mandatory = 3 * n * 4 + k * 12

    def call():
        return dgp_kernels.select_ef_multi([g], [e], TOP, KEEP)

    def reset():
        e.copy_(e0)

    # Reference result of the default configuration (and of the C++ CPU kernel).
    reset()
    ref = call()
    ref_e = e.clone()
    torch.cuda.synchronize()
    cpu_same = "not built"
    if info.cpu == "cpp":
        ec = e0.cpu()
        cpu = torch.ops.dgp.select_ef_multi([g.cpu()], [ec], TOP, KEEP)
        same = (torch.equal(cpu[0], ref[0].cpu()) and torch.equal(_bits(cpu[1]), _bits(ref[1]))
                and torch.equal(cpu[2], ref[2].cpu()) and torch.equal(_bits(ec), _bits(ref_e)))
        cpu_same = "yes" if same else "NO"
    print(f"# 25M EF: GPU bit-exact vs the C++ CPU kernel: {cpu_same}")
    report["gpu_vs_cpp_exact"] = cpu_same

    # 2. per-kernel profile of one call (after warm-up), and host wall time of a call.
    for _ in range(3):
        reset()
        call()
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.reps):
        reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    report["wall_ms"] = _median(walls)
    per_kernel = _kernel_ms(call, 5, before=reset)
    total = _dgp_total(per_kernel)
    print(f"# one call (median of {args.reps}): host wall {report['wall_ms']:.3f} ms; "
          "device time per kernel (ms per call, 5 calls profiled; the residual reset between "
          "calls shows as elementwise/copy kernels):")
    for kname, v in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
        print(f"#   {v:8.3f}  {kname[:90]}")
    print(f"#   {total:8.3f}  total of the dgp kernels")
    report["per_kernel_ms"] = per_kernel

    # 3. the sweep (the other knobs at their defaults), each setting checked against the
    # default configuration's bits; CUDA-event time of a call and device time of its kernels.
    rows = []
    for names, settings in _parse_knobs(args.knobs):
        defaults = tuple(getattr(ts, name) for name in names)
        label = ":".join(names)
        for values in settings:
            for name, value in zip(names, values):
                setattr(ts, name, type(getattr(ts, name))(value))
            ts._PLANS.clear()
            ts._GRAPHS.clear()
            ts._GRAPH_SEEN.clear()
            shown = ":".join(str(v) for v in values)
            try:
                reset()
                out = call()
                same = (torch.equal(out[0], ref[0]) and torch.equal(out[1].view(torch.int32),
                        ref[1].view(torch.int32)) and torch.equal(e.view(torch.int32),
                        ref_e.view(torch.int32)))
                ms = _median(_events_ms(call, args.reps, before=reset))
                dev_ms = _dgp_total(_kernel_ms(call, 3, before=reset))
                is_default = tuple(type(d)(v) for d, v in zip(defaults, values)) == defaults
                rows.append(dict(knob=label, value=shown, median_ms=ms, device_ms=dev_ms,
                                 bytes_per_s=mandatory / (ms * 1e-3), exact=same,
                                 default=is_default))
                print(f"# {label}={shown:>9}: {ms:7.3f} ms (kernels {dev_ms:6.3f})  "
                      f"{mandatory / (ms * 1e-3) / 1e9:6.0f} GB/s mandatory  "
                      f"{mandatory / (ms * 1e-3) / bw:5.1%} of copy  exact={same}"
                      + ("  (default)" if is_default else ""))
            except Exception as exc:  # a configuration the compiler rejects: report it
                print(f"# {label}={shown}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                rows.append(dict(knob=label, value=shown, median_ms=float("nan"), exact=False))
        for name, default in zip(names, defaults):
            setattr(ts, name, default)
    ts._PLANS.clear()
    report["sweep"] = rows
    for line in _summary(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _summary(rows):
    """One line per swept knob: its fastest bit-exact setting against the default setting
    (the default configuration's time where the knob's own list did not hold it)."""
    lines = ["# best bit-exact setting per knob (CUDA-event medians; same process, noisy):"]
    default_ms = [r["median_ms"] for r in rows if r.get("default")]
    for knob in dict.fromkeys(r["knob"] for r in rows):
        mine = [r for r in rows  # (NaN: the setting failed)
                if r["knob"] == knob and r["exact"] and r["median_ms"] == r["median_ms"]]
        if not mine:
            lines.append(f"#   {knob}: no bit-exact setting ran")
            continue
        best = min(mine, key=lambda r: r["median_ms"])
        base = [r["median_ms"] for r in rows if r["knob"] == knob and r.get("default")]
        ref = base[0] if base else (min(default_ms) if default_ms else float("nan"))
        lines.append(f"#   {knob}={best['value']}: {best['median_ms']:.3f} ms vs default "
                     f"{ref:.3f} ms ({best['median_ms'] / ref - 1:+.1%})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
