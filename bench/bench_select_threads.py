"""ResNet-18 gradient list through the CPU kernel at a given thread count, in the
environment this process was started with (``OMP_WAIT_POLICY`` set or not).

    python bench/bench_select_threads.py --threads 2 --repeats 15
    python bench/bench_select_threads.py --compare --threads 2 --busy   # driver, see below
    python bench/bench_select_threads.py --threads 2 --settle-ms 20     # after torch's workers sleep

One process times, interleaved round-robin, ``select_ef_multi`` over the whole list and one
``select_ef`` call per tensor (residuals zeroed before each repeat, untimed), plus ``copy_``
of the same tensors, and prints medians in ms as one JSON line. ``--no-torch-ops`` times our
calls alone (no ``copy_``, no zeroing): torch's own parallel ops run in OpenMP regions whose
idle workers keep spinning after them unless ``OMP_WAIT_POLICY=PASSIVE`` is set, which slows
whatever runs next, ours included.

``--compare`` is the driver: it starts this script as child processes, alternately without
``OMP_WAIT_POLICY`` and with ``OMP_WAIT_POLICY=PASSIVE`` (``--pairs`` times each; with
``--spincount N`` also with ``GOMP_SPINCOUNT=N`` and no wait policy), optionally
with one busy-looping process on the machine (``--busy``, killed at the end), and prints the
per-environment medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def resnet18_grads():
    """The CIFAR ResNet-18 gradient list (real gradients when the model code is available,
    else ``randn`` tensors of the same 62 shapes)."""
    try:
        from dgp_kernels.speed import model_gradients

        return model_gradients("resnet18_cifar", "real", batch=8, seed=0)[0]
    except Exception:  # the model code moved or is absent: same shapes, random values
        pass
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            s = stride if b == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if s != 1 or cin != cout:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(10, 512), (10,)]
    return [torch.randn(s, generator=gen) * 1e-3 for s in shapes]


def child(args) -> None:
    import dgp_kernels

    torch.set_num_threads(args.threads)
    gs = resnet18_grads()
    res = [torch.zeros_like(g) for g in gs]
    bufs = [torch.empty_like(g) for g in gs]

    def multi():
        dgp_kernels.select_ef_multi(gs, res)

    def per_layer():
        for g, e in zip(gs, res):
            dgp_kernels.select_ef(g, e)

    def copy():
        for b, g in zip(bufs, gs):
            b.copy_(g)

    methods = {"multi": multi, "per_layer": per_layer}
    if not args.no_torch_ops:
        methods["copy"] = copy
    times = {k: [] for k in methods}
    for m in methods.values():
        m()
    for r in range(args.repeats):
        names = list(methods)
        names = names[r % len(names):] + names[: r % len(names)]
        for k in names:
            if not args.no_torch_ops:
                for e in res:
                    e.zero_()
            if args.settle_ms:
                time.sleep(args.settle_ms / 1e3)
            t0 = time.perf_counter()
            methods[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))


def compare(args) -> None:
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        envs = ["default", "PASSIVE"]
        if args.spincount is not None:
            envs.append(f"GOMP_SPINCOUNT={args.spincount}")
        runs = {k: [] for k in envs}
        for p in range(args.pairs):
            order = envs[p % len(envs):] + envs[:p % len(envs)]
            for envname in order:
                env = dict(os.environ)
                env.pop("OMP_WAIT_POLICY", None)
                env.pop("GOMP_SPINCOUNT", None)
                if envname == "PASSIVE":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                elif envname.startswith("GOMP_SPINCOUNT="):
                    env["GOMP_SPINCOUNT"] = str(args.spincount)
                out = subprocess.run(
                    [sys.executable, __file__, "--threads", str(args.threads),
                     "--repeats", str(args.repeats)]
                    + (["--no-torch-ops"] if args.no_torch_ops else []),
                    env=env, capture_output=True, text=True, check=True).stdout
                runs[envname].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    print(f"threads={args.threads} busy={args.busy} pairs={args.pairs} "
          f"load={os.getloadavg()[0]:.2f} torch={torch.__version__}")
    for k in runs["default"][0]:
        d = statistics.median(r[k] for r in runs["default"])
        p = statistics.median(r[k] for r in runs["PASSIVE"])
        line = f"{k:10s} default {d:8.2f} ms  PASSIVE {p:8.2f} ms  default/PASSIVE {d / p:5.2f}"
        if args.spincount is not None:
            sc = statistics.median(r[k] for r in runs[envs[2]])
            line += f"  {envs[2]} {sc:8.2f} ms  /PASSIVE {sc / p:5.2f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--spincount", type=int, default=None,
                    help="--compare also runs children with GOMP_SPINCOUNT set to this (how long "
                         "torch's idle OpenMP workers spin before sleeping; 0: sleep at once)")
    ap.add_argument("--no-torch-ops", action="store_true",
                    help="time only our calls: no copy_ row, residuals not re-zeroed (torch's "
                         "own parallel ops leave OpenMP workers spinning after them)")
    ap.add_argument("--settle-ms", type=float, default=0.0,
                    help="sleep this long after the untimed zeroing, before each timed call: "
                         "long enough (20 ms here) and torch's OpenMP workers have stopped "
                         "spinning, so the difference to 0 is what their spinning costs the call")
    args = ap.parse_args()
    compare(args) if args.compare else child(args)


if __name__ == "__main__":
    main()
