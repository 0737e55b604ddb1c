"""Simulator overhead on the CIFAR ResNet-18, and the error-feedback gap study.
Not part of `pytest`.

    python bench/bench_sim.py [--rounds 3] [--clients 10] [--batch 32] [--threads 1,2]
                              [--defenses none,dgp] [--device cpu] [--json out.json]
    OMP_NUM_THREADS=1 python bench/bench_sim.py --study ef-gap [--seeds 5] [--rounds 150]
                              [--clients 10] [--lr 0.1] [--threads 1] [--runs]
                              [--out bench/results/ef_gap]
    OMP_NUM_THREADS=1 python bench/bench_sim.py --study ef-policies [--seeds 10] [--lr 0.05]
                              [--rounds 150] [--split iid|dirichlet] [--alpha 0.3]
                              [--out bench/results/ef_policies] [--table-only]
                              [--at-rounds 150,300]
    python bench/bench_sim.py --study ef-matrix --cells DIR,DIR,... [--at-rounds 150,300]
                              [--out bench/results/ef_matrix]

``--study ef-policies`` runs ``bench/studies/efpolicy.py``: ``none``, ``dgp`` with every
``top_feedback`` policy, ``dgp top=0`` and ``adgp`` on the same seeds, one JSON per run
under ``--out``/runs as they finish (a run already there is not repeated, so the study
resumes), then the table (``ef_policies.md``), ``ef_policies.json`` and ``ef_policies.png``
from the seeds every variant completed; ``--table-only`` just re-tabulates. ``--at-rounds
150`` also tabulates the same runs cut after round 150 into ``--out``/r150 (a run's first
150 rounds are exactly the 150-round run: nothing in a round depends on the total, tested),
so one 300-round study gives both. ``--study ef-matrix`` puts several such folders (cells:
split x lr, at each ``--at-rounds``) side by side in ``ef_matrix.md/.json/.png``.

``--study ef-gap`` runs ``bench/studies/efgap.py``'s ``ef_gap_study`` on the default simulator
configuration (built-in digits, convnet_small, FedSGD, 10 clients, 150 rounds, one thread):
``none``, ``dgp`` (defaults), ``dgp`` with ``top=0`` (same band width, no top cut) and
``dgp`` without error feedback, over the seeds in sequence, and writes ``ef_gap.md``,
``ef_gap.json`` (with the environment, load average before and after, wall time) and
``ef_gap.png`` to ``--out`` (``--runs`` adds every run's JSON/CSV). The rest of this
docstring is about the overhead benchmark (the default).

FedSGD, ``--clients`` clients x ``--batch`` CIFAR-shaped random samples (uniform pixels,
random labels; written once as tiny CIFAR-10 python batches in a temporary folder and read
by the simulator's own loader), ``--rounds`` rounds of which the first is warm-up.

* ``baseline``: the same training loop with no codec — per client one forward/backward on
  its 32 samples, gradients cloned, plain dense averaging, the server's SGD step
  (momentum 0.9, weight decay 1e-4);
* ``sim none``: :func:`dgp_kernels.sim.simulate` with ``defense="none"``: every gradient
  goes through the compressor, ``encode``, ``decode_accumulate``, and the broadcast is
  encoded for the download count (the full payload path);
* ``sim dgp``: the same with DGP (top 5 %, keep 20 %, error feedback).

Per-round times exclude evaluation (``SimResult.rounds[i]["round_s"]``; one test sample is
evaluated after the last round only), and each round's local-training seconds are timed
too (``local_s``). Reported: median seconds per round over the timed rounds; the overhead
end to end, ``sim none / baseline - 1``, which drifts with the load
of a shared machine between runs; the overhead in-run, ``(round - local) / local`` of
``sim none`` minus the same for the baseline: the time the payload path adds relative to
the local computation of the same rounds (robust to load drift); DGP's extra seconds per
round outside local training over ``sim none``. Device, versions, thread count and load
average are recorded; on the shared 2-vCPU machine run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # `python bench/bench_sim.py` from a checkout
    sys.path.insert(0, os.path.dirname(HERE))

import dgp_kernels  # noqa: E402
from dgp_kernels.sim import SimConfig, build_model, load_dataset, simulate  # noqa: E402
from dgp_kernels.cases.datasets import iid_split  # noqa: E402


def _environment(device: str) -> Dict[str, str]:
    env = {
        "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()), "torch": torch.__version__, "dgp_kernels": dgp_kernels.__version__,
        "python": platform.python_version(), "device": device,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_fake_cifar(root: str, n_train: int, n_test: int = 10, seed: int = 0) -> None:
    """CIFAR-10 python batches with random pixels and labels (n_train split over 5 files)."""
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [len(a) for a in np.array_split(np.arange(n_train), 5)]
    for name, n in [(f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def baseline_rounds(cfg: SimConfig) -> List[Tuple[float, float]]:
    """(seconds per round, of which local forward/backward) of the plain loop (no codec):
    same model, data, partition, steps."""
    device = torch.device(cfg.device)
    x, y = load_dataset("cifar10", cfg.data_root, "train")
    shards = iid_split(x.shape[0], cfg.clients, cfg.seed)
    model = build_model(cfg).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    times = []
    for _ in range(cfg.rounds):
        _sync(cfg.device)
        t = time.perf_counter()
        local = 0.0
        acc = [torch.zeros_like(p) for p in params]
        for c in range(cfg.clients):
            t_local = time.perf_counter()
            idx = shards[c][torch.randperm(shards[c].numel(), generator=gen)[: cfg.batch_size]]
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
            _sync(cfg.device)
            local += time.perf_counter() - t_local
            grads = [p.grad.detach().clone() for p in params]
            for a, g in zip(acc, grads):
                a.add_(g)
        for p, a in zip(params, acc):
            p.grad = a.div_(cfg.clients)
        opt.step()
        _sync(cfg.device)
        times.append((time.perf_counter() - t, local))
    return times


def sim_rounds(cfg: SimConfig) -> List[Tuple[float, float]]:
    """(seconds per round without evaluation, of which local training) from the simulator."""
    res = simulate(cfg, progress=False)
    return [(r["round_s"], r["local_s"]) for r in res.rounds]


def study_ef_gap(args: argparse.Namespace) -> int:
    """``--study ef-gap``: see the module docstring."""
    from bench.studies.efgap import ef_gap_study, write_ef_gap
    from dgp_kernels.sim.multiseed import parse_seeds

    seeds = parse_seeds(args.seeds)
    threads = int((args.threads or "1").split(",")[0])
    base = SimConfig(rounds=args.rounds or 150, clients=args.clients, threads=threads,
                     device=args.device, lr=args.lr)
    env = _environment(args.device)
    env.update(threads=str(threads), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "(unset)"),
               started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    t0 = time.perf_counter()
    study = ef_gap_study(base, seeds, progress=not args.no_progress)
    env["wall_s"] = f"{time.perf_counter() - t0:.1f}"
    env["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = args.out or os.path.join(HERE, "results", "ef_gap")
    paths = write_ef_gap(study, out, runs=args.runs, extra=env)
    print(study.markdown())
    print(f"environment: {json.dumps(env)}", file=sys.stderr)
    print(f"written: {paths}", file=sys.stderr)
    return 0


def study_ef_policies(args: argparse.Namespace) -> int:
    """``--study ef-policies``: see ``bench/studies/efpolicy.py``."""
    from bench.studies.efpolicy import load_policy_study, run_policy_study, write_ef_policies
    from dgp_kernels.sim.multiseed import parse_seeds

    seeds = parse_seeds(args.seeds)
    threads = int((args.threads or "1").split(",")[0])
    base = SimConfig(rounds=args.rounds or 150, clients=args.clients, threads=threads,
                     device=args.device, lr=args.lr, split=args.split, alpha=args.alpha)
    out = args.out or os.path.join(HERE, "results", "ef_policies")
    env = _environment(args.device)
    env.update(threads=str(threads), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "(unset)"),
               started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    t0 = time.perf_counter()
    if not args.table_only:
        run_policy_study(base, seeds, out, progress=not args.no_progress,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    env["wall_s"] = f"{time.perf_counter() - t0:.1f}"
    env["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    study = load_policy_study(out, seeds=seeds)
    paths = write_ef_policies(study, out, extra=env)
    print(open(paths["md"]).read())
    # The same runs cut at fewer rounds (exactly the shorter study's runs) -> <out>/r<n>/.
    for n in _at_rounds(args.at_rounds):
        if n < study.rounds:
            sub = os.path.join(out, f"r{n}")
            write_ef_policies(load_policy_study(out, seeds=seeds, rounds=n), sub,
                              extra=dict(env, cut_at_round=str(n)))
            print(f"written: {sub} (the runs cut after round {n})", file=sys.stderr)
    print(f"environment: {json.dumps(env)}", file=sys.stderr)
    print(f"written: {paths}", file=sys.stderr)
    return 0


def _at_rounds(text) -> List[int]:
    if not text:
        return []
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--at-rounds {text!r} must be a comma list of round counts (150,300)") from None
    if not vals or any(v < 1 for v in vals):
        raise SystemExit(f"--at-rounds {text!r} must be a comma list of round counts >= 1")
    return vals


def study_ef_matrix(args: argparse.Namespace) -> int:
    """``--study ef-matrix``: the policy study's cells side by side (``ef_matrix.md/.json/.png``)."""
    from bench.studies.efpolicy import load_policy_study, write_policy_matrix

    if not args.cells:
        raise SystemExit("--study ef-matrix needs --cells DIR,DIR,... (ef-policies output folders)")
    dirs = [d for d in args.cells.split(",") if d]
    cells = []
    for n in _at_rounds(args.at_rounds) or [None]:
        for d in dirs:
            full = load_policy_study(d)
            if n is None or n <= full.rounds:
                cells.append(full if n in (None, full.rounds) else load_policy_study(d, rounds=n))
    out = args.out or os.path.join(HERE, "results", "ef_matrix")
    env = _environment(args.device)
    env["cells"] = ",".join(dirs)
    paths = write_policy_matrix(cells, out, extra=env)
    print(open(paths["md"]).read())
    print(f"written: {paths}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", choices=("ef-gap", "ef-policies", "ef-matrix"), default=None,
                    help="run a study instead of the overhead benchmark (see the docstring)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per run (overhead: default 3, the first is warm-up; ef-gap: 150)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", default=None, help="overhead: default 1,2; ef-gap: default 1")
    ap.add_argument("--defenses", default="none,dgp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seeds", default="5", help="ef-gap: a count (5 -> 0..4) or a list 0,1,2")
    ap.add_argument("--out", default=None, help="ef-gap: output folder (default bench/results/ef_gap)")
    ap.add_argument("--runs", action="store_true", help="ef-gap: also write every run's JSON/CSV")
    ap.add_argument("--lr", type=float, default=SimConfig().lr,
                    help="ef-gap: the server learning rate of every run (default: SimConfig's 0.1)")
    ap.add_argument("--split", default="iid", help="ef-policies: iid (default) or dirichlet")
    ap.add_argument("--alpha", type=float, default=0.3, help="ef-policies: Dirichlet alpha (default 0.3)")
    ap.add_argument("--table-only", action="store_true",
                    help="ef-policies: only tabulate the runs already under --out")
    ap.add_argument("--at-rounds", default=None,
                    help="ef-policies, ef-matrix: also tabulate the runs cut after these rounds "
                         "(150,300; a prefix of a run is exactly the shorter run)")
    ap.add_argument("--cells", default=None,
                    help="ef-matrix: comma list of ef-policies output folders")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.study == "ef-gap":
        return study_ef_gap(args)
    if args.study == "ef-policies":
        return study_ef_policies(args)
    if args.study == "ef-matrix":
        return study_ef_matrix(args)
    args.rounds = 3 if args.rounds is None else args.rounds
    args.threads = args.threads or "1,2"
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (the first round is warm-up)")
    out = {"environment": _environment(args.device), "cases": []}
    with tempfile.TemporaryDirectory() as root:
        write_fake_cifar(root, args.clients * args.batch)
        for th in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(th)
            base_cfg = SimConfig(dataset="cifar10", data_root=root, model="resnet18_cifar",
                                 clients=args.clients, batch_size=args.batch, rounds=args.rounds,
                                 eval_every=args.rounds, test_limit=1, threads=th, device=args.device)
            rows = {"baseline": baseline_rounds(base_cfg)}
            for d in args.defenses.split(","):
                cfg = SimConfig(**dict(base_cfg.to_dict(), defense=d))
                rows[f"sim {d}"] = sim_rounds(cfg)
            med = {k: statistics.median(t for t, _ in v[1:]) for k, v in rows.items()}
            # Outside local training: the payload path + server step (sim), the dense
            # averaging + server step (baseline). As a fraction of the same rounds' local
            # time it does not drift with the machine's load between runs.
            rest = {k: statistics.median((t - loc) / loc for t, loc in v[1:]) for k, v in rows.items()}
            rest_s = {k: statistics.median(t - loc for t, loc in v[1:]) for k, v in rows.items()}
            case = {"threads": th, "rounds": {k: [list(x) for x in v] for k, v in rows.items()},
                    "median_s": med, "nonlocal_s": rest_s, "nonlocal_over_local": rest,
                    "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}
            if "sim none" in med:
                case["overhead_none_end_to_end"] = med["sim none"] / med["baseline"] - 1.0
                case["overhead_none_in_run"] = rest["sim none"] - rest["baseline"]
            if "sim dgp" in med and "sim none" in med:
                case["dgp_extra_s"] = rest_s["sim dgp"] - rest_s["sim none"]
            out["cases"].append(case)
            print(f"threads={th} (load {case['loadavg']}):", file=sys.stderr)
            for k, v in rows.items():
                print(f"  {k:10s} median {med[k]:.3f} s/round, outside local training "
                      f"{rest_s[k]:.3f} s = {100 * rest[k]:.1f} % of local; rounds "
                      f"{[(round(t, 2), round(loc, 2)) for t, loc in v]}", file=sys.stderr)
            if "overhead_none_end_to_end" in case:
                print(f"  overhead of the payload path: end to end (sim none / baseline - 1) "
                      f"{100 * case['overhead_none_end_to_end']:+.1f} %, in-run (extra non-local "
                      f"time / local time) {100 * case['overhead_none_in_run']:+.1f} %", file=sys.stderr)
            if "dgp_extra_s" in case:
                print(f"  DGP extra per round over sim none: {case['dgp_extra_s']:+.3f} s", file=sys.stderr)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
