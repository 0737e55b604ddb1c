"""Size sweep of the CPU band selection against torch.topk, np.partition and copy_.

    python bench/bench_select_sizes.py                       # 1e1 .. 1e7, float32 + bf16, 1 thread
    python bench/bench_select_sizes.py --max-size 1e8 --threads 1,2 --json sweep.json
    python bench/bench_select_sizes.py --sizes 1000,4096,20000 --dtypes float32 --rounds 15

The sweep itself is :func:`dgp_kernels.speed.size_sweep` (also ``dgp bench --sweep``);
this script adds the dtype ratios and a JSON file. For every size n (one tensor of ``randn``
entries), dtype and thread count, one process times, interleaved round-robin (the order rotates each round, so a noisy shared machine
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
from typing import Dict, List, Optional

import torch

from dgp_kernels.machine import cpu_model
from dgp_kernels.speed import SWEEP_DTYPES, SWEEP_SIZES, size_sweep


def _header() -> Dict[str, object]:
    import dgp_kernels

    info = dgp_kernels.backend_info()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "dgp_kernels": dgp_kernels.__version__, "backend": str(info),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_start": os.getloadavg()[0],
    }


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
             else [s for s in SWEEP_SIZES if s <= args.max_size])
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in SWEEP_DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r}; choose from {sorted(SWEEP_DTYPES)}")
    threads = [int(t) for t in args.threads.split(",")]
    res = {"header": _header()}
    import sys

    res["rows"] = size_sweep(sizes, dtypes, threads, args.rounds, args.batch_us,
                             progress=sys.stdout)
    h = res["header"]
    h["load_end"] = os.getloadavg()[0]
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
