"""Size sweep of the CPU band selection against torch.topk, np.partition and copy_.

    python bench/bench_select_sizes.py                       # 1e1 .. 1e7, float32 + bf16, 1 thread
    python bench/bench_select_sizes.py --max-size 1e8 --threads 1,2 --json sweep.json
    python bench/bench_select_sizes.py --sizes 1000,4096,20000 --dtypes float32 --rounds 15

For every size n (one tensor of ``randn`` entries), dtype and thread count, one process
times, interleaved round-robin (the order rotates each round, so a noisy shared machine
slows every method alike), median over rounds of the per-call time:

| key | what |
|---|---|
| ``select`` | ``dgp_kernels.select(g)`` (the public wrapper, defaults top=0.05 keep=0.20) |
| ``select_ef`` | ``dgp_kernels.select_ef(g, e)`` (each call gets its own zeroed residual, made untimed) |
| ``topk`` | ``torch.topk(g.abs(), n // 5)`` (the abs included: the selection it replaces) |
| ``partition`` | ``np.partition(np.abs(a), n - n // 5)`` on a float32 numpy copy (numpy has no bf16) |
| ``copy`` | ``buf.copy_(g)``: one read and one write of the tensor, the bandwidth yardstick |

Small sizes repeat each call in a batch (``--batch-us``, default ~2 ms per batch) and divide.
Rows give the median and the minimum over rounds (on a shared machine other processes only
ever add time, so the minimum is the steadier comparison; both are printed and stored).
The header names the CPU, core count, torch and dgp_kernels versions, the backend and SIMD
level, ``OMP_WAIT_POLICY`` (normally unset) and the load average before and after. Printed
ratios: ``select_ef / topk`` and ``select / topk`` per row, and ``dtype / float32`` of
``select_ef`` where both dtypes ran. ``main(argv)`` returns the result dict (for ``dgp bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from dgp_kernels.machine import cpu_model

DEFAULT_SIZES = [10, 100, 1_000, 2_000, 4_096, 5_000, 9_999, 10_000, 20_000, 32_768,
                 100_000, 1_000_000, 10_000_000, 100_000_000]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _header() -> Dict[str, object]:
    import dgp_kernels

    info = dgp_kernels.backend_info()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "dgp_kernels": dgp_kernels.__version__, "backend": str(info),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_start": os.getloadavg()[0],
    }


def _time_methods(methods, n: int, rounds: int, batch_us: float) -> Dict[str, tuple]:
    """(median, min) per-call microseconds of each method, interleaved round-robin.

    ``methods[name](reps)`` returns a callable that is called ``reps`` times in a row per
    round (it may prepare per-call inputs first, untimed, e.g. fresh zeroed residuals)."""
    names = list(methods)
    reps = {}
    for k in names:  # warm-up, and the batch size that makes one batch ~batch_us
        f = methods[k](2)
        f()
        t0 = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t0, 1e-7) * 1e6
        reps[k] = max(1, min(2_000, int(batch_us / dt)))
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            m = reps[k]
            f = methods[k](m)
            t0 = time.perf_counter()
            for _ in range(m):
                f()
            times[k].append((time.perf_counter() - t0) * 1e6 / m)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def sweep(sizes: List[int], dtypes: List[str], threads: List[int], rounds: int = 9,
          batch_us: float = 2000.0, verbose: bool = True) -> Dict[str, object]:
    import dgp_kernels

    out: Dict[str, object] = {"header": _header(), "rows": []}
    prev_threads = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for dname in dtypes:
                dtype = DTYPES[dname]
                for n in sizes:
                    gen = torch.Generator().manual_seed(n)
                    g = torch.randn(n, generator=gen).to(dtype)
                    buf = torch.empty_like(g)
                    a = g.float().numpy()
                    k = n // 5

                    def select_ef(reps, g=g):
                        # one zeroed residual per call: every call does the same work
                        it = iter([torch.zeros_like(g) for _ in range(reps)])
                        return lambda: dgp_kernels.select_ef(g, next(it))

                    methods = {
                        "select": lambda reps: (lambda: dgp_kernels.select(g)),
                        "select_ef": select_ef,
                        "topk": lambda reps: (lambda: torch.topk(g.abs(), k)),
                        "partition": lambda reps: (lambda: np.partition(np.abs(a), n - k)),
                        "copy": lambda reps: (lambda: buf.copy_(g)),
                    }
                    rr = rounds if n < 10_000_000 else max(3, rounds // 3)
                    med = _time_methods(methods, n, rr, batch_us)
                    row = {"threads": t, "dtype": dname, "n": n,
                           **{f"{m}_us": v[0] for m, v in med.items()},
                           **{f"{m}_min_us": v[1] for m, v in med.items()}}
                    out["rows"].append(row)
                    if verbose:
                        print(_fmt_row(row), flush=True)
    finally:
        torch.set_num_threads(prev_threads)
    out["header"]["load_end"] = os.getloadavg()[0]
    return out


def _fmt_row(r: Dict[str, object]) -> str:
    return (f"t={r['threads']} {r['dtype']:8s} n={r['n']:>11,d}  select {r['select_us']:10.1f}  "
            f"select_ef {r['select_ef_us']:10.1f}  topk {r['topk_us']:10.1f}  "
            f"partition {r['partition_us']:10.1f}  copy {r['copy_us']:9.1f} us (medians)  "
            f"ef/topk {r['select_ef_us'] / r['topk_us']:5.2f}  sel/topk {r['select_us'] / r['topk_us']:5.2f}  "
            f"| mins: ef {r['select_ef_min_us']:.1f} sel {r['select_min_us']:.1f} topk {r['topk_min_us']:.1f} "
            f"ef/topk {r['select_ef_min_us'] / r['topk_min_us']:5.2f} sel/topk {r['select_min_us'] / r['topk_min_us']:5.2f}")


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (default 10 .. max-size)")
    ap.add_argument("--max-size", type=float, default=1e7, help="largest size of the default list")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch-us", type=float, default=2000.0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sizes = ([int(float(s)) for s in args.sizes.split(",")] if args.sizes
             else [s for s in DEFAULT_SIZES if s <= args.max_size])
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    threads = [int(t) for t in args.threads.split(",")]
    res = sweep(sizes, dtypes, threads, args.rounds, args.batch_us)
    h = res["header"]
    print(f"# {h['cpu']}, {h['cores']} cores, torch {h['torch']}, {h['backend']}, "
          f"OMP_WAIT_POLICY={h['omp_wait_policy']}, load {h['load_start']:.2f} -> {h['load_end']:.2f}")
    by = {(r["threads"], r["dtype"], r["n"]): r for r in res["rows"]}
    for (t, d, n), r in by.items():
        if d != "float32" and (t, "float32", n) in by:
            f = by[(t, "float32", n)]
            print(f"t={t} n={n:>11,d} {d}/float32: select_ef {r['select_ef_us'] / f['select_ef_us']:.2f}x  "
                  f"select {r['select_us'] / f['select_us']:.2f}x (medians); select_ef "
                  f"{r['select_ef_min_us'] / f['select_ef_min_us']:.2f}x  select "
                  f"{r['select_min_us'] / f['select_min_us']:.2f}x (mins)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
