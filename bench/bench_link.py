"""DDP over a slow link: step time, bytes on the wire, traffic floor and time to accuracy of
plain all-reduce, torch's fp16 and PowerSGD hooks, and the DGP / ADGP hooks. Not part of
`pytest`.

    python bench/bench_link.py --quick                     # ~2-3 minutes
    nice -n 19 python bench/bench_link.py --json link.json --plot link.png   # full (~40 min)

The script re-executes itself in a private network namespace (``unshare -n``;
``bench_link_netns.py``) whose only interface is ``lo``; rank 0 limits ``lo`` with a ``tbf``
qdisc to each rate in turn, checks ``tc`` and a timed transfer (the run fails if the link
is not shaped), and counts the bytes that cross ``lo`` during the timed steps. All ranks
(gloo, 127.0.0.1) share that one qdisc: the rate limits the **sum** of every rank's
traffic, as one shared link would. Nothing outside the namespace is touched; the namespace
and its qdisc vanish when the run ends.

Methods (DDP, gloo, CPU, one process per rank, ``--threads`` torch threads per rank):
``allreduce`` (DDP's own), ``fp16`` (torch's ``fp16_compress_hook``), ``powersgd``
(torch's ``powerSGD_hook``, rank 4, compressing from step 2), ``dgp`` / ``dgp_bf16`` (the
DGP hook, top 5 %, keep 20 %, error feedback; float32 / bfloat16 values) and ``adgp`` /
``adgp_bf16`` (the aligned hook: rank 0's band broadcast as a bitmap, values all-reduced).

Phases:

* **step** — ``resnet18_cifar`` (and ``convnet_small``) on random 3x32x32 data, batch
  ``--batch`` per rank: median over steps of the slowest rank's step time, per link rate
  (``fast`` = unshaped lo) and world size. Beside each time: the bytes that crossed lo per
  step (measured) and what the traffic model predicts, the **floor**
  ``max(T_fast, T_fwd + T_opt + link_s)`` and ``time / floor``. ``T_fast`` is the method's
  fastest step on the unshaped link (compute + codec + fast transfer); ``T_fwd + T_opt``
  is the part of a step communication cannot overlap (the gradients exist only from the
  backward pass on), measured in the same steps (per step the smallest forward and the
  smallest optimizer time over ranks; median over steps); ``link_s`` is the bytes
  through lo (less what tbf lets pass at once after idle spells) at the link rate. PowerSGD runs in one bucket, so none of
  its traffic overlaps compute: its floor is ``T_fast + link_s``. ``hidden s`` measures
  the overlap: ``T_fast + link_s - time``, what the step hides of its compute-and-codec
  time plus its link time (0: fully serial). ``cpu s`` and ``runq s``: the on-CPU time and
  the runqueue wait (ready to run, no core free) of all threads of the rank that was
  slowest in the step (``/proc/<pid>/task/*/schedstat``), medians over steps. The rest of
  a step is sleep: waiting on the link or on a peer. A step slowed by other processes
  shows a long runqueue wait; one slowed by a protocol wait does not.
* **tta** — the small CNN on the 8x8 digits (``convnet_small``, one channel), each rank its
  own shard, batch ``--tta-batch`` per rank, SGD with momentum and a cosine schedule, at the
  ``--tta-rate`` link: training wall time (evaluation excluded) until the test accuracy
  first reaches ``--target``, and the final accuracy after ``--tta-steps``.
* **crossover** — ``convnet_small`` step time at world sizes ``--cross-worlds`` on the
  ``--cross-rate`` link: sparse all-gather (``dgp``) traffic grows as ``W (W-1) P`` against
  all-reduce's ``2 (W-1) S``; the world size where ``dgp`` stops beating ``allreduce`` is
  reported measured (interpolated) and from the model (``W* = 2 S / P``).

The traffic model (total bytes through lo per step): ring all-reduce of ``S`` bytes over
``W`` ranks ``2 (W-1) S``; gloo's all-gather of ``P`` bytes per rank (a ring) ``W (W-1) P``;
a broadcast of ``B`` bytes ``(W-1) B``. The machine's cores are shared by all ranks, so
compute is part of every step (with 4 ranks x 1 thread on 2 cores each rank gets half a
core): the header records cores, threads per rank and the load average.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_link_netns as netns  # noqa: E402
from bench_ddp import _environment, spawn_ranks  # noqa: E402

METHODS = ("allreduce", "fp16", "powersgd", "dgp", "dgp_bf16", "adgp", "adgp_bf16")
DGP_PARAMS = {"top": 0.05, "keep": 0.2}
POWERSGD_RANK = 4
POWERSGD_START = 2


# ---------------------------------------------------------------------------------------
# rank side
# ---------------------------------------------------------------------------------------
def _wrap(model, method: str, world: int, bucket_cap_mb: Optional[float] = None):
    """``(ddp_model, hook_state)`` for a method (hook_state: the DGPHookState or None)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dgp_kernels.integrations.ddp import DGPHookState, dgp_hook

    # PowerSGD issues its second and third all-reduce from the first one's callback; with
    # several buckets on gloo, ranks can then start them in different orders (a collective
    # mismatch: "Received data size doesn't match expected size"). One bucket avoids that.
    ddp = DDP(model, bucket_cap_mb=4096 if method == "powersgd" else bucket_cap_mb)
    state = None
    if method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method == "powersgd":
        st = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=POWERSGD_RANK,
                                         start_powerSGD_iter=POWERSGD_START)
        ddp.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
    elif method != "allreduce":
        comp = "adgp" if method.startswith("adgp") else "dgp"
        params = dict(DGP_PARAMS)
        if method.endswith("_bf16"):
            params["value_dtype"] = "bfloat16"
        state = DGPHookState(compressor=comp, params=params)
        ddp.register_comm_hook(state, dgp_hook)
    return ddp, state


def model_bytes(method: str, world: int, numels: List[int], shapes, state_steps=None) -> float:
    """Traffic model: total bytes through lo per step for one method."""
    W = world
    S = 4 * sum(numels)
    if method == "allreduce":
        return 2 * (W - 1) * S
    if method == "fp16":
        return 2 * (W - 1) * S / 2
    if method == "powersgd":
        per = 0
        for shp in shapes:
            n = shp[0] if len(shp) else 1
            m = int(math.prod(shp)) // max(n, 1)
            r = min(POWERSGD_RANK, n, m)
            if len(shp) > 1 and n * m > 2 * r * (n + m):  # PowerSGD's min_compression_rate 2
                per += 4 * r * (n + m)
            else:
                per += 4 * n * m
        return 2 * (W - 1) * per
    if not state_steps:
        return float("nan")
    coll = statistics.median(s["collective_bytes"] for s in state_steps)
    if method.startswith("dgp"):
        return W * (W - 1) * coll  # ring all-gather of the fixed-width slots
    values = statistics.median(s["payload_bytes"] for s in state_steps)
    bitmap = sum((n + 7) // 8 for n in numels)
    return 2 * (W - 1) * values + (W - 1) * bitmap


def _shape(rank: int, rate: Optional[str], info: Dict) -> None:
    """Rank 0 (root in the namespace) sets the link; everyone waits at a barrier."""
    import torch.distributed as dist

    if rank == 0:
        link = info.pop("_link", None)
        if link is not None:
            link.__exit__(None, None, None)
        link = netns.ShapedLink(rate)
        link.__enter__()
        info["_link"] = link
        info["probe_bps"] = link.measured_bps
    dist.barrier()


def _rank_main(rank: int, world: int, port: int, job: Dict, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch

    torch.set_num_threads(job["threads"])
    import torch.distributed as dist

    from dgp_kernels.cases.models import get_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    info: Dict = {}
    try:
        if job["phase"] == "tta":
            res = _tta(rank, world, job, info)
        else:
            res = _steps(rank, world, job, info)
        dist.barrier()
        if rank == 0:
            with open(os.path.join(out, "result.json"), "w") as f:
                json.dump(res, f)
    finally:
        link = info.pop("_link", None)
        if link is not None:
            link.__exit__(None, None, None)
        dist.destroy_process_group()


def sched_ns() -> List[int]:
    """``[on-CPU ns, runqueue-wait ns]`` summed over this process's threads so far
    (``/proc/<pid>/task/*/schedstat``; threads that ended are not counted). Runqueue wait is
    time a thread was ready to run but had no core: it tells a step slowed by other
    processes (or by this run's own ranks sharing the cores) from one that waited on the
    link or on a peer (asleep, neither on a CPU nor queued)."""
    tot = [0, 0]
    base = "/proc/self/task"
    for t in os.listdir(base):
        try:
            with open(f"{base}/{t}/schedstat") as f:
                a = f.read().split()
        except OSError:  # the thread ended meanwhile
            continue
        tot[0] += int(a[0])
        tot[1] += int(a[1])
    return tot


def _steps(rank: int, world: int, job: Dict, info: Dict) -> Dict:
    import torch
    import torch.distributed as dist

    from dgp_kernels.cases.models import get_model

    name, batch = job["model"], job["batch"]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    loss_fn = torch.nn.functional.cross_entropy
    out: Dict = {"model": name, "world": world, "rows": [], "local": {}}

    # the compute floor: no DDP, all ranks computing at once (they share the cores)
    torch.manual_seed(0)
    net = get_model(name)
    numels = [p.numel() for p in net.parameters()]
    shapes = [tuple(p.shape) for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    fw, bw, op = [], [], []
    for step in range(job["warmup"] + job["local_steps"]):
        dist.barrier()
        opt.zero_grad()
        t0 = time.perf_counter()
        loss = loss_fn(net(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if step >= job["warmup"]:
            fw.append(t1 - t0)
            bw.append(t2 - t1)
            op.append(t3 - t2)
    local = {k: statistics.median(v) for k, v in (("fwd", fw), ("bwd", bw), ("opt", op))}
    # the slowest rank's medians
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    out["local"] = {k: max(d[k] for d in gathered) for k in local}

    for method in job["methods"]:
        torch.manual_seed(0)
        net = get_model(name)
        ddp, state = _wrap(net, method, world, job.get("bucket_cap_mb"))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)

        def one_step():
            """One step; its forward and optimizer times (what no link time can overlap)."""
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(ddp(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            return t1 - t0, time.perf_counter() - t2

        warm_done = False
        for rate in job["rates"]:
            _shape(rank, None if rate == "fast" else rate, info)
            warm = job["warmup"] if not warm_done else job["rewarm"]
            warm_done = True
            steps = job["steps_fast"] if rate == "fast" else job["steps"]
            times, cpu, runq, exposed = [], [], [], []
            b0 = netns.lo_bytes()
            for s in range(warm + steps):
                if s == warm:
                    dist.barrier()
                    b0 = netns.lo_bytes()
                dist.barrier()
                if job.get("dump_after"):
                    # a stalled step: every thread's Python stack to this rank's stderr
                    faulthandler.dump_traceback_later(job["dump_after"], exit=False)
                c0 = sched_ns()
                t0 = time.perf_counter()
                fwd_opt = one_step()
                dt = time.perf_counter() - t0
                c1 = sched_ns()
                if job.get("dump_after"):
                    faulthandler.cancel_dump_traceback_later()
                if s >= warm:
                    times.append(dt)
                    cpu.append((c1[0] - c0[0]) / 1e9)
                    runq.append((c1[1] - c0[1]) / 1e9)
                    exposed.append(fwd_opt)
            dist.barrier()
            lo = netns.lo_bytes() - b0
            # barriers: a few hundred bytes each; counted with the steps (negligible)
            all_times = [None] * world
            dist.all_gather_object(all_times, (times, cpu, runq, exposed))
            slowest = [max(t[0][i] for t in all_times) for i in range(steps)]
            # per step, the CPU time and runqueue wait of the rank that was slowest in it
            who = [max(range(world), key=lambda r: all_times[r][0][i]) for i in range(steps)]
            cpu_s = [all_times[who[i]][1][i] for i in range(steps)]
            runq_s = [all_times[who[i]][2][i] for i in range(steps)]
            # the step's traffic starts after the first rank's forward pass and every rank
            # runs its optimizer after the traffic: per step the smallest forward plus the
            # smallest optimizer time over ranks, measured in the step itself
            fwd_opt_s = [min(t[3][i][0] for t in all_times) + min(t[3][i][1] for t in all_times)
                         for i in range(steps)]
            st = [s.__dict__ for s in state.steps[-steps:]] if state is not None else None
            row = {"method": method, "rate": rate, "median_s": statistics.median(slowest), "min_s": min(slowest),
                   "times": slowest, "cpu_s": statistics.median(cpu_s), "runq_s": statistics.median(runq_s),
                   "cpu_times": cpu_s, "runq_times": runq_s, "fwd_opt_s": statistics.median(fwd_opt_s),
                   "fwd_opt_times": fwd_opt_s, "lo_bytes_per_step": lo / steps,
                   "model_bytes_per_step": model_bytes(method, world, numels, shapes, st),
                   "payload_bytes": st[-1]["payload_bytes"] if st else None,
                   "dense_bytes": 4 * sum(numels), "probe_bps": info.get("probe_bps"),
                   "load": os.getloadavg()}
            if rank == 0 and info.get("_link") is not None and rate != "fast":
                row["qdisc"] = info["_link"].stats()
            out["rows"].append(row)
            if rank == 0:
                print(f"  [{name} W={world}] {method:<10} {rate:>8}: {row['median_s']:.3f} s "
                      f"({row['lo_bytes_per_step'] / 1e6:.2f} MB/step on lo)", flush=True)
        del ddp, state, opt
    return out


def _tta(rank: int, world: int, job: Dict, info: Dict) -> Dict:
    """Time to accuracy on the digits: each rank its own IID shard."""
    import torch
    import torch.distributed as dist

    from dgp_kernels.cases.datasets import iid_split, load_dataset
    from dgp_kernels.cases.models import get_model

    xtr, ytr = load_dataset("digits", split="train")
    xte, yte = load_dataset("digits", split="test")
    shard = iid_split(len(ytr), world, seed=0)[rank]
    xs, ys = xtr[shard], ytr[shard]
    out: Dict = {"model": "convnet_small(digits)", "world": world, "rate": job["rate"], "rows": []}
    _shape(rank, job["rate"], info)
    for method in job["methods"]:
        torch.manual_seed(0)
        net = get_model("convnet_small", channels=1)
        ddp, state = _wrap(net, method, world)
        opt = torch.optim.SGD(ddp.parameters(), lr=job["lr"], momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, job["tta_steps"])
        g = torch.Generator().manual_seed(1000 + rank)
        wall, reached, curve = 0.0, None, []
        b0 = netns.lo_bytes()
        for chunk in range(job["tta_steps"] // job["eval_every"]):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(job["eval_every"]):
                idx = torch.randint(0, len(ys), (job["tta_batch"],), generator=g)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(xs[idx]), ys[idx]).backward()
                opt.step()
                sched.step()
            dist.barrier()
            wall += time.perf_counter() - t0
            with torch.no_grad():
                acc = (net(xte).argmax(1) == yte).float().mean().item()
            step = (chunk + 1) * job["eval_every"]
            curve.append((step, wall, acc))
            if reached is None and acc >= job["target"]:
                reached = (step, wall)
        lo = netns.lo_bytes() - b0
        row = {"method": method, "target": job["target"], "reached_step": reached[0] if reached else None,
               "reached_s": reached[1] if reached else None, "final_acc": curve[-1][2],
               "wall_s": wall, "steps": job["tta_steps"], "curve": curve, "lo_bytes": lo,
               "probe_bps": info.get("probe_bps"), "load": os.getloadavg()}
        out["rows"].append(row)
        if rank == 0:
            r = f"{reached[1]:.1f} s (step {reached[0]})" if reached else "not reached"
            print(f"  [digits W={world} {job['rate']}] {method:<10}: target {job['target']:.2f} at {r}, "
                  f"final acc {curve[-1][2]:.4f}, wall {wall:.1f} s", flush=True)
        del ddp, state, opt
    return out


# ---------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------
def _spawn(world: int, job: Dict, timeout_s: float) -> Dict:
    with tempfile.TemporaryDirectory() as out:
        spawn_ranks(_rank_main, world, job, out, timeout_s, what=f"job {job['phase']}, world {world}:")
        with open(os.path.join(out, "result.json")) as f:
            return json.load(f)


def _rate_bps(rate: str) -> Optional[float]:
    return None if rate == "fast" else float(netns.parse_rate(rate))


# Methods the benchmark runs in a single DDP bucket: their communication starts only after
# the whole backward pass, so nothing of it overlaps compute. The value: how many
# collectives of a step start after an idle spell of the link (PowerSGD: the uncompressed
# tensors, then P, then Q, each after compute), so each can take a full tbf burst at once.
ONE_BUCKET = {"powersgd": 3}


def add_floors(res: Dict) -> None:
    """Per row: the floor and the ratio ``time / floor``.

    Floor ``max(T_fast, T_fwd + T_opt + link_s)`` (``T_fwd + T_opt`` from the row's own
    steps; files without them: the block's compute without DDP); for a method run in one bucket
    (``ONE_BUCKET``) ``T_fast + link_s``. ``T_fast`` is the method's *fastest* step on the
    unshaped link (its compute + codec without a link to wait on; the minimum, because a
    floor must not carry the stalls a median can pick up on a shared machine). ``link_s``
    is the step's bytes through lo at the nominal rate, less one tbf burst (a full bucket of
    tokens passes at once after an idle spell) per collective that follows one (one per
    step; ``ONE_BUCKET`` gives PowerSGD's three)."""
    burst = netns.BURST_BYTES
    for blk in res["step"]:
        fast = {r["method"]: r.get("min_s", r["median_s"]) for r in blk["rows"] if r["rate"] == "fast"}
        local = blk["local"]["fwd"] + blk["local"]["opt"]
        plain = {r["rate"]: r["median_s"] for r in blk["rows"] if r["method"] == "allreduce"}
        for r in blk["rows"]:
            exposed = r.get("fwd_opt_s", local)
            bps = _rate_bps(r["rate"])
            bursts = ONE_BUCKET.get(r["method"], 1) * burst
            link_s = 8 * max(0.0, r["lo_bytes_per_step"] - bursts) / bps if bps else 0.0
            t_fast = fast.get(r["method"], 0.0)
            r["link_s"] = link_s
            if r["method"] in ONE_BUCKET:
                r["floor_s"] = t_fast + link_s
            else:
                r["floor_s"] = max(t_fast, exposed + link_s)
            r["vs_floor"] = r["median_s"] / r["floor_s"] if r["floor_s"] else float("nan")
            # overlap: what the step hides of (its fast-link time + its link time)
            r["hidden_s"] = t_fast + link_s - r["median_s"] if r["rate"] != "fast" else 0.0
            r["vs_plain"] = r["median_s"] / plain[r["rate"]] if r["rate"] in plain else float("nan")


def crossover(res: Dict) -> Dict:
    """World size where dgp (sparse all-gather) stops beating allreduce: measured (linear
    interpolation of the time ratio between measured world sizes) and modelled (2 S / P)."""
    out: Dict = {}
    blks = sorted(res.get("cross", []), key=lambda b: b["world"])
    for method in ("dgp", "dgp_bf16"):
        pts = []
        for b in blks:
            t = {r["method"]: r for r in b["rows"] if r["rate"] == res["args"]["cross_rate"]}
            if method in t and "allreduce" in t:
                pts.append((b["world"], t[method]["median_s"] / t["allreduce"]["median_s"],
                            t[method]["payload_bytes"] / t[method]["dense_bytes"]))
        if not pts:
            continue
        measured = None
        for (w0, r0, _), (w1, r1, _) in zip(pts, pts[1:]):
            if r0 < 1.0 <= r1:
                measured = w0 + (1.0 - r0) * (w1 - w0) / (r1 - r0)
                break
        if measured is None and pts[-1][1] < 1.0:
            measured = f"> {pts[-1][0]}"
        ratio = statistics.median(p[2] for p in pts)
        out[method] = {"ratios": [(w, round(r, 3)) for w, r, _ in pts], "measured": measured,
                       "model": 2.0 / ratio if ratio else None, "payload_over_dense": ratio}
    return out


def print_report(res: Dict) -> None:
    env = res["env"]
    print("# bench_link: DDP over a rate-limited loopback (tbf in a private network namespace)")
    for k, v in env.items():
        print(f"#   {k}: {v}")
    for blk in res["step"]:
        loc = blk["local"]
        print(f"\n## {blk['model']}, {blk['world']} ranks: compute without DDP fwd {loc['fwd']:.3f} s, "
              f"bwd {loc['bwd']:.3f} s, opt {loc['opt']:.3f} s (slowest rank)")
        print(f"{'method':<11}{'rate':>9}{'probe':>8}{'median s':>10}{'vs plain':>9}{'lo MB/step':>11}"
              f"{'model MB':>9}{'fwd+opt':>8}{'link s':>8}{'floor s':>8}{'/floor':>7}{'hidden s':>9}{'cpu s':>7}{'runq s':>7}"
              f"{'drops':>6}  load")
        for r in blk["rows"]:
            probe = f"{r['probe_bps'] / 1e6:.0f}M" if r.get("probe_bps") else "-"
            drops = r.get("qdisc", {}).get("dropped", "-")
            print(f"{r['method']:<11}{r['rate']:>9}{probe:>8}{r['median_s']:>10.3f}{r['vs_plain']:>9.3f}"
                  f"{r['lo_bytes_per_step'] / 1e6:>11.2f}{r['model_bytes_per_step'] / 1e6:>9.2f}"
                  f"{r.get('fwd_opt_s', float('nan')):>8.3f}{r['link_s']:>8.3f}{r['floor_s']:>8.3f}{r['vs_floor']:>7.2f}{r['hidden_s']:>9.3f}"
                  f"{r.get('cpu_s', float('nan')):>7.2f}{r.get('runq_s', float('nan')):>7.2f}{drops!s:>6}  "
                  f"{r['load'][0]:.2f}")
    for blk in res.get("tta", []):
        print(f"\n## time to accuracy: {blk['model']}, {blk['world']} ranks at {blk['rate']}")
        base = next((r for r in blk["rows"] if r["method"] == "allreduce"), None)
        print(f"{'method':<11}{'target':>7}{'reached s':>10}{'step':>6}{'speedup':>8}{'final acc':>10}"
              f"{'wall s':>8}{'lo MB':>8}")
        for r in blk["rows"]:
            sp = (base["reached_s"] / r["reached_s"]) if base and base["reached_s"] and r["reached_s"] else float("nan")
            rs = f"{r['reached_s']:.1f}" if r["reached_s"] is not None else "-"
            print(f"{r['method']:<11}{r['target']:>7.2f}{rs:>10}{r['reached_step'] or '-'!s:>6}{sp:>8.2f}"
                  f"{r['final_acc']:>10.4f}{r['wall_s']:>8.1f}{r['lo_bytes'] / 1e6:>8.2f}")
    if res.get("crossover"):
        print("\n## crossover world size (dgp sparse all-gather vs all-reduce, convnet_small, "
              f"{res['args']['cross_rate']})")
        for m, c in res["crossover"].items():
            print(f"{m}: time ratio vs allreduce by world {c['ratios']}; measured crossover {c['measured']}; "
                  f"model 2S/P = {c['model']:.1f} (payload/dense {c['payload_over_dense']:.3f})")


def plot(res: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blks = [b for b in res["step"]]
    fig, axes = plt.subplots(1, len(blks), figsize=(5.5 * len(blks), 4.2), squeeze=False)
    for ax, blk in zip(axes[0], blks):
        for m in METHODS:
            pts = sorted((_rate_bps(r["rate"]), r["median_s"]) for r in blk["rows"]
                         if r["method"] == m and r["rate"] != "fast")
            if pts:
                ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Mbit/s, shared by all ranks)")
        ax.set_ylabel("median step time (s)")
        ax.set_title(f"{blk['model']}, {blk['world']} ranks")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(a) -> Dict:
    env = _environment()
    env.update(threads_per_rank=str(a.threads), cores=str(os.cpu_count()), batch=str(a.batch),
               loadavg_start=" ".join(f"{x:.2f}" for x in os.getloadavg()),
               nice=str(os.nice(0)), netns=str(netns.netns_id()))
    res: Dict = {"env": env, "args": vars(a), "step": [], "tta": [], "cross": []}
    methods = [m for m in a.methods.split(",") if m]
    base = {"threads": a.threads, "batch": a.batch, "warmup": a.warmup, "rewarm": a.rewarm,
            "local_steps": a.local_steps, "bucket_cap_mb": a.bucket_cap_mb, "dump_after": a.dump_after}
    for model in [m for m in a.models.split(",") if m]:
        for world in [int(w) for w in a.worlds.split(",")]:
            print(f"# step: {model}, {world} ranks, rates {a.rates}", flush=True)
            job = dict(base, phase="step", model=model, methods=methods, rates=a.rates.split(","),
                       steps=a.steps, steps_fast=a.steps_fast)
            res["step"].append(_spawn(world, job, a.timeout))
    for world in [int(w) for w in a.tta_worlds.split(",") if w]:
        print(f"# tta: digits, {world} ranks at {a.tta_rate}", flush=True)
        job = dict(base, phase="tta", methods=[m for m in a.tta_methods.split(",") if m], rate=a.tta_rate,
                   tta_steps=a.tta_steps, eval_every=a.eval_every, tta_batch=a.tta_batch, target=a.target,
                   lr=a.lr)
        res["tta"].append(_spawn(world, job, a.timeout))
    for world in [int(w) for w in a.cross_worlds.split(",") if w]:
        print(f"# crossover: convnet_small, {world} ranks at {a.cross_rate}", flush=True)
        job = dict(base, phase="step", model="convnet_small", methods=["allreduce", "dgp", "dgp_bf16", "adgp"],
                   rates=["fast", a.cross_rate], steps=a.cross_steps, steps_fast=a.cross_steps)
        res["cross"].append(_spawn(world, job, a.timeout))
    env["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    add_floors(res)
    for blk in res["cross"]:
        add_floors({"step": [blk]})
    res["crossover"] = crossover(res)
    return res


def merge_results(paths: List[str]) -> Dict:
    """Saved result files as one: the first file's environment and arguments, every file's
    blocks (each block keeps its own rows, loads and per-step times), floors recomputed."""
    res: Optional[Dict] = None
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        if res is None:
            res = r
            res["sources"] = [{"path": os.path.basename(path), "env": r["env"]}]
            continue
        res["sources"].append({"path": os.path.basename(path), "env": r["env"]})
        for k in ("step", "tta", "cross"):
            res[k] = res.get(k, []) + r.get(k, [])
        res["crossover"] = res.get("crossover") or r.get("crossover")
    if res is None:
        raise ValueError("--from-json needs at least one file")
    add_floors(res)
    for blk in res.get("cross", []):
        add_floors({"step": [blk]})
    return res


def _report(res: dict, a: argparse.Namespace) -> None:
    """Print the report and write --json / --plot."""
    print_report(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.plot:
        plot(res, a.plot)
        print(f"# plot: {a.plot}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run (2-3 minutes)")
    ap.add_argument("--models", default="resnet18_cifar")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--rates", default="fast,1gbit,200mbit,50mbit")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method and shaped rate")
    ap.add_argument("--steps-fast", type=int, default=5, help="timed steps on the unshaped link")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of a fresh model (DDP rebuilds buckets after step 1)")
    ap.add_argument("--rewarm", type=int, default=1, help="untimed steps after each rate change")
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bucket-cap-mb", type=float, default=None,
                    help="DDP bucket size for every method but powersgd (default: DDP's 25 MiB)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tta-worlds", default="4")
    ap.add_argument("--tta-rate", default="50mbit")
    ap.add_argument("--tta-methods", default=",".join(METHODS))
    ap.add_argument("--tta-steps", type=int, default=400)
    ap.add_argument("--tta-batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--lr", type=float, default=0.1, help="SGD momentum 0.9, cosine decay to 0")
    ap.add_argument("--cross-worlds", default="2,4,6,8")
    ap.add_argument("--cross-rate", default="50mbit")
    ap.add_argument("--cross-steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per spawned group")
    ap.add_argument("--dump-after", type=float, default=None,
                    help="print every thread's Python stack when a step runs longer than this (seconds)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", nargs="+", default=None, metavar="PATH",
                    help="no run: merge saved result files (their step, tta and crossover blocks), "
                         "recompute the floors, print the report, write --json / --plot")
    a = ap.parse_args(argv)
    if a.from_json:
        _report(merge_results(a.from_json), a)
        return
    if a.quick:
        a.worlds, a.rates, a.steps, a.steps_fast, a.warmup, a.local_steps = "2", "fast,200mbit", 2, 2, 2, 2
        a.tta_worlds, a.tta_steps, a.eval_every, a.cross_worlds = "2", 150, 25, "2,4"
        a.cross_steps, a.target = 3, 0.6
    for r in a.rates.split(",") + [a.tta_rate, a.cross_rate]:
        if r != "fast":
            netns.parse_rate(r)
    if a.threads < 1 or a.steps < 1 or a.warmup < 1 or a.batch < 1:
        ap.error("--threads, --steps, --warmup and --batch must be >= 1")
    netns.reexec_in_netns([os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))
    netns.check_private_netns()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    _report(run(a), a)


if __name__ == "__main__":
    main()
