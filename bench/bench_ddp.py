"""Step time of the DGP DDP communication hook vs plain DDP all-reduce.
Not part of `pytest`.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_ddp.py                  # both models, 2 ranks
    python bench/bench_ddp.py --models convnet_small --steps 5 --warmup 1
    python bench/bench_ddp.py --json out.json

Spawns ``--world`` CPU ranks (default 2) in one gloo process group on 127.0.0.1. Each rank
trains each model (``resnet18_cifar``: 11.2M parameters in 62 tensors; ``convnet_small``:
57k parameters in 8 tensors) on random 3x32x32 batches with SGD, in four modes, measured in
the same processes one after the other:

* ``local``     — no DDP, no communication: the compute floor of a step;
* ``allreduce`` — DDP with its built-in all-reduce (the baseline);
* ``dgp``       — DDP + :func:`dgp_kernels.integrations.ddp.dgp_hook` (DGP top 5 %, keep 20 %,
  error feedback; encode, all-gather, decode and average);
* ``adgp``      — the same hook in aligned mode (rank 0's band broadcast as a bitmap,
  values all-reduced).

A step is ``zero_grad, forward, backward (with the hook), optimizer.step``; every step starts
after a barrier. ``--warmup`` untimed steps first (DDP rebuilds its buckets after the first),
then ``--steps`` timed ones; the table shows the median and min over steps of the slowest
rank, the overhead over ``local`` and the bytes each rank passed to collectives per step.

Both ranks share this machine's cores, so compute and communication compete: on the
project's 2-vCPU machines with ``--threads 1`` each rank has about one core. The header
records device, versions, threads and the load average at start and end (the machine is
shared: numbers are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # `python bench/bench_ddp.py` from a checkout
    sys.path.insert(0, os.path.dirname(HERE))

MODES = ("local", "allreduce", "dgp", "adgp")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, args: Dict, out: str, timeout_s: float, what: str = "benchmark") -> None:
    """Start ``target(rank, world, port, args, out)`` in ``world`` spawned processes, wait at
    most ``timeout_s`` in all, kill any rank still alive, and raise unless every rank exited 0."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # bounded: never leave a rank behind
            if p.is_alive():
                p.kill()
                p.join(5)
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        raise RuntimeError(f"{what} ranks exited with {codes}")


def _rank(rank: int, world: int, port: int, args: Dict, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(args["threads"])
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook
    from dgp_kernels.cases.models import get_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    results: List[Dict] = []
    g = torch.Generator().manual_seed(rank)
    for name in args["models"]:
        for mode in MODES:
            torch.manual_seed(0)
            net = get_model(name)
            state = None
            if mode == "local":
                model = net
            else:
                model = DDP(net)
                if mode in ("dgp", "adgp"):
                    state = DGPHookState(compressor=mode, params={"top": 0.05, "keep": 0.2})
                    model.register_comm_hook(state, dgp_hook)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            x = torch.randn(args["batch"], 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (args["batch"],), generator=g)
            times = []
            for step in range(args["warmup"] + args["steps"]):
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                dt = time.perf_counter() - t0
                if step >= args["warmup"]:
                    times.append(dt)
            numel = sum(p.numel() for p in net.parameters())
            if state is not None:
                coll = statistics.median(s.collective_bytes for s in state.steps[args["warmup"]:])
                payload = statistics.median(s.payload_bytes for s in state.steps[args["warmup"]:])
            elif mode == "allreduce":
                coll = payload = 4 * numel
            else:
                coll = payload = 0
            results.append({"model": name, "mode": mode, "rank": rank, "times": times, "numel": numel,
                            "collective_bytes": coll, "payload_bytes": payload})
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _environment() -> Dict[str, str]:
    import dgp_kernels

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": platform.node(), "cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "dgp_kernels": dgp_kernels.__version__, "backend": str(dgp_kernels.backend_info()),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}


def run(models: List[str], world: int = 2, steps: int = 8, warmup: int = 2, batch: int = 8,
        threads: int = 1, timeout_s: float = 1800.0) -> Dict:
    """Spawn the ranks, wait (bounded), and return ``{"env": ..., "rows": [...]}``: per model and
    mode the median/min step seconds of the slowest rank and the bytes per step."""
    env = _environment()
    env["loadavg_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env.update(world=str(world), threads_per_rank=str(threads), batch=str(batch), steps=str(steps),
               warmup=str(warmup))
    args = {"models": models, "steps": steps, "warmup": warmup, "batch": batch, "threads": threads}
    with tempfile.TemporaryDirectory() as out:
        spawn_ranks(_rank, world, args, out, timeout_s)
        per_rank = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    env["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for i, row in enumerate(per_rank[0]):
        # a step ends for everyone when the slowest rank is done: take the max over ranks
        slowest = [max(per_rank[r][i]["times"][s] for r in range(world)) for s in range(steps)]
        rows.append({"model": row["model"], "mode": row["mode"], "numel": row["numel"],
                     "median_s": statistics.median(slowest), "min_s": min(slowest),
                     "collective_bytes": row["collective_bytes"], "payload_bytes": row["payload_bytes"]})
    return {"env": env, "rows": rows}


def print_table(res: Dict) -> None:
    env = res["env"]
    print("# bench_ddp: step time of the DGP DDP hook vs DDP all-reduce (gloo, CPU, 127.0.0.1)")
    for k, v in env.items():
        print(f"#   {k}: {v}")
    print(f"{'model':<16}{'mode':<11}{'median ms':>10}{'min ms':>9}{'vs local':>10}{'vs allred':>10}"
          f"{'coll. bytes/step':>18}{'payload/dense':>15}")
    local = {r["model"]: r["median_s"] for r in res["rows"] if r["mode"] == "local"}
    allred = {r["model"]: r["median_s"] for r in res["rows"] if r["mode"] == "allreduce"}
    for r in res["rows"]:
        dense = 4 * r["numel"]
        ratio = f"{r['payload_bytes'] / dense:.3f}" if r["mode"] != "local" else "-"
        print(f"{r['model']:<16}{r['mode']:<11}{1e3 * r['median_s']:>10.1f}{1e3 * r['min_s']:>9.1f}"
              f"{r['median_s'] / local[r['model']]:>10.2f}{r['median_s'] / allred[r['model']]:>10.2f}"
              f"{int(r['collective_bytes']):>18}{ratio:>15}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18_cifar,convnet_small")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.world < 2 or a.steps < 1 or a.warmup < 1 or a.batch < 1 or a.threads < 1:
        ap.error("--world >= 2, --steps >= 1, --warmup >= 1 (DDP rebuilds buckets after step 1), --batch >= 1, --threads >= 1")
    res = run([m for m in a.models.split(",") if m], a.world, a.steps, a.warmup, a.batch, a.threads)
    print_table(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
