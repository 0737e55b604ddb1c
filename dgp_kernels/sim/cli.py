"""``dgp train``: simulate collaborative learning under one or more defenses and write the
accuracy / bytes results (JSON and CSV per defense, a summary, PNG plots).

Top-level imports are argparse only, so ``dgp --help`` stays fast; the simulator, torch and
the plotting stack are imported in :func:`run_from_args`.

Example::

    dgp train --defenses none,dgp,topk,dp --rounds 150 --out runs/digits
    dgp train --defenses dgp --defense-param dgp.top=0.02 --defense-param dgp.keep=0.1
    dgp train --defenses none,dgp --seeds 5          # seeds 0..4: mean ± std, paired difference
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:  # pragma: no cover
    from .config import SimConfig

__all__ = ["add_arguments", "run_from_args"]

# Mirrors SimConfig's defaults (dgp_kernels/sim/config.py); a test checks they agree.
_DEFAULTS = dict(dataset="digits", model="convnet_small", clients=10, rounds=150, algorithm="fedsgd",
                 batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4, local_epochs=1,
                 participation=1.0, split="iid", alpha=0.5, seed=0, device="cpu", eval_every=1,
                 test_limit=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``dgp train`` options on ``parser``."""
    d = _DEFAULTS
    g = parser.add_argument_group("run")
    g.add_argument("--defenses", default="none,dgp",
                   help="comma-separated defenses (compressor names: none, dgp, adgp, topk, randk, "
                        "dp, qsgd); one run each, same seed (default: none,dgp)")
    g.add_argument("--defense-param", action="append", default=[], metavar="DEFENSE.PARAM=VALUE",
                   help="a compressor parameter, repeatable: dgp.top=0.05, dgp.keep=0.2, "
                        "dgp.error_feedback=false, dgp.value_dtype=bfloat16, dp.clip=1, "
                        "dp.noise_multiplier=0.01, qsgd.levels=15, adgp.positions=fresh")
    g.add_argument("--out", default=None,
                   help="output directory (default: runs/train-<UTC timestamp>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--diagnostics", action="store_true",
                   help="also record error-feedback residual norms per round")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the small default models run "
                        "fastest on one thread on a 2-vCPU machine; raise it for resnet18_cifar)")
    g = parser.add_argument_group("data and model")
    g.add_argument("--dataset", default=d["dataset"],
                   help="digits (built in, offline), mnist, cifar10, cifar100 (default: digits)")
    g.add_argument("--data-root", default=None,
                   help="directory holding the MNIST/CIFAR files (torchvision layout or the raw "
                        "archives' folders)")
    g.add_argument("--model", default=d["model"],
                   help="convnet_small, lenet_sigmoid, resnet18_cifar (default: convnet_small)")
    g.add_argument("--device", default=d["device"], help="torch device for local training")
    g = parser.add_argument_group("federation")
    g.add_argument("--algorithm", default=d["algorithm"], choices=("fedsgd", "fedavg"))
    g.add_argument("--clients", type=int, default=d["clients"])
    g.add_argument("--rounds", type=int, default=d["rounds"])
    g.add_argument("--participation", type=float, default=d["participation"],
                   help="fraction of clients sampled per round (default 1.0)")
    g.add_argument("--split", default=d["split"], choices=("iid", "dirichlet"))
    g.add_argument("--alpha", type=float, default=d["alpha"], help="Dirichlet concentration")
    g.add_argument("--batch-size", type=int, default=d["batch_size"])
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--lr-steps", default="",
                   help="learning-rate steps ROUND:LR,... e.g. 100:0.01,140:0.005")
    g.add_argument("--momentum", type=float, default=d["momentum"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--local-epochs", type=int, default=d["local_epochs"], help="FedAvg only")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=d["seed"])
    seeds.add_argument("--seeds", default=None, metavar="SEEDS",
                       help="run every defense once per seed: a count (5 -> seeds 0..4) or a "
                            "comma list (0,1,2,3,4; 7, for the single seed 7); the summary gives "
                            "mean ± std over seeds and the paired difference to none")
    g.add_argument("--eval-every", type=int, default=d["eval_every"])
    g.add_argument("--test-limit", type=int, default=d["test_limit"],
                   help="evaluate on at most this many test samples (0: all)")


def _parse_lr_steps(text: str):
    steps = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            r, v = item.split(":")
            steps.append([int(r), float(v)])
        except ValueError:
            raise ValueError(f"--lr-steps item {item!r} must look like ROUND:LR, e.g. 100:0.01") from None
    return steps


def run_from_args(args: argparse.Namespace) -> int:
    """Run every defense of ``args.defenses`` and write the results; returns the exit code
    (2 for a bad option, with the message on stderr)."""
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"dgp train: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import json

    from .config import SimConfig, parse_defense_params
    from .multiseed import parse_seeds
    from .results import plot_results, write_summary
    from .simulator import simulate

    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    if not defenses:
        raise ValueError("--defenses is empty; give e.g. none,dgp")
    if len(set(defenses)) != len(defenses):
        raise ValueError(f"--defenses lists a defense twice: {args.defenses!r}")
    params = parse_defense_params(args.defense_param, defenses)
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    configs = []
    for name in defenses:
        cfg = SimConfig(
            dataset=args.dataset, model=args.model, defense=name, defense_params=params[name],
            clients=args.clients, rounds=args.rounds, algorithm=args.algorithm,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, lr_steps=_parse_lr_steps(args.lr_steps),
            local_epochs=args.local_epochs, participation=args.participation, split=args.split,
            alpha=args.alpha, seed=args.seed, data_root=args.data_root, device=args.device,
            eval_every=args.eval_every, test_limit=args.test_limit, diagnostics=args.diagnostics,
            threads=args.threads,
        )
        configs.append(cfg.validate())  # every config checked before the first run starts
    out = args.out or os.path.join("runs", "train-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(out, exist_ok=True)
    if seeds is not None:
        return _run_seeds(args, configs, seeds, defenses, out)
    results = []
    for cfg in configs:
        res = simulate(cfg, progress=not args.no_progress)
        res.to_json(os.path.join(out, f"{cfg.defense}.json"))
        res.to_csv(os.path.join(out, f"{cfg.defense}.csv"))
        results.append(res)
        print(f"[dgp train] {cfg.defense}: final accuracy {res.final_accuracy:.4f}, upload "
              f"{res.total_upload_bytes:,} B, download {res.total_download_bytes:,} B, "
              f"{res.wall_s:.1f} s", file=sys.stderr)
    summary = write_summary(results, os.path.join(out, "summary"))
    if not args.no_plots:
        plot_results(results, out)
    print(summary["markdown"])
    print(f"results in {out}")
    with open(os.path.join(out, "command.json"), "w") as f:
        json.dump({"argv": sys.argv, "defenses": defenses}, f, indent=2)
    return 0


def _run_seeds(args: argparse.Namespace, configs: "List[SimConfig]", seeds: List[int],
               defenses: List[str], out: str) -> int:
    """``--seeds``: every defense once per seed (seeds in sequence), then the multi-seed
    files of :meth:`MultiSeedResult.write` and the table on stdout."""
    import json

    from .multiseed import simulate_seeds

    multi = simulate_seeds(configs, seeds, progress=not args.no_progress)
    for row in multi.per_seed_rows():
        print(f"[dgp train] {row['label']} seed {row['seed']}: final accuracy "
              f"{row['final_accuracy']:.4f}, upload {row['upload_bytes']:,} B "
              f"({row['upload_vs_baseline']:.3f} of {multi.baseline}), {row['wall_s']:.1f} s",
              file=sys.stderr)
    multi.write(out, plots=not args.no_plots)
    print(multi.markdown())
    print(f"results in {out}")
    with open(os.path.join(out, "command.json"), "w") as f:
        json.dump({"argv": sys.argv, "defenses": defenses, "seeds": seeds}, f, indent=2)
    return 0
