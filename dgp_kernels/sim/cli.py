"""``dgp train``: simulate collaborative learning under one or more defenses and write the
accuracy / bytes results (JSON and CSV per defense, a summary, PNG plots).

Top-level imports are argparse only, so ``dgp --help`` stays fast; the simulator, torch and
the plotting stack are imported in :func:`run_from_args`.

Example::

    dgp train --defenses none dgp topk dp --rounds 150 --out runs/digits
    dgp train --defenses none "dgp:top=0.02,keep=0.1" "dgp:error_feedback=false"
    dgp train --defenses none dgp --seeds 5          # seeds 0..4: mean ± std, paired difference
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:  # pragma: no cover
    from .config import SimConfig

__all__ = ["add_arguments", "run_from_args"]

# Mirrors SimConfig's defaults (dgp_kernels/sim/config.py); a test checks they agree.
_DEFAULTS = dict(dataset="digits", model="convnet_small", clients=10, rounds=150, algorithm="fedsgd",
                 batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4, local_epochs=1,
                 participation=1.0, split="iid", alpha=0.5, seed=0, device="cpu", eval_every=1,
                 test_limit=0)

#: SimConfig field -> the flag that sets it (error messages name the flag).
FLAGS = {
    "dataset": "--dataset", "model": "--model", "defense": "--defenses",
    "defense_params": "--defenses", "clients": "--clients", "rounds": "--rounds",
    "algorithm": "--algorithm", "batch_size": "--batch-size", "lr": "--lr",
    "momentum": "--momentum", "weight_decay": "--weight-decay", "lr_steps": "--lr-steps",
    "local_epochs": "--local-epochs", "participation": "--participation", "split": "--split",
    "alpha": "--alpha", "seed": "--seed", "data_root": "--data-root", "device": "--device",
    "eval_every": "--eval-every", "test_limit": "--test-limit", "threads": "--threads",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``dgp train`` options on ``parser``."""
    d = _DEFAULTS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "defense specs: NAME or NAME:KEY=VALUE,... (the syntax of `dgp evaluate --defenses`\n"
        "and of SimConfig(defense=...)); NAME is none, dgp, adgp, topk, randk, dp or qsgd and\n"
        "the keys are that compressor's keyword arguments, e.g.\n"
        "  dgp:top=0.02,keep=0.1   dgp:error_feedback=false   dgp:value_dtype=bfloat16\n"
        "  dgp:top_feedback=clipped   dp:clip=1,noise_multiplier=0.01   qsgd:levels=15\n"
        "  adgp:positions=aggregate\n"
    )
    g = parser.add_argument_group("run")
    g.add_argument("--defenses", nargs="+", default=["none", "dgp"], metavar="SPEC",
                   help="defense specs, one run each with the same seed; a word may also hold "
                        "a comma list (none,dgp:top=0.1) (default: none dgp)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output folder, created before the run (default: runs/train-<UTC "
                        "timestamp>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--diagnostics", action="store_true",
                   help="also record error-feedback residual norms per round")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (the small default models run fastest on one "
                        "thread on a 2-vCPU machine; raise it for resnet18_cifar) "
                        "(default: %(default)s)")
    g = parser.add_argument_group("data and model")
    g.add_argument("--dataset", default=d["dataset"],
                   help="digits (built in, offline), mnist, cifar10, cifar100 "
                        "(default: %(default)s)")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the MNIST/CIFAR files (torchvision layout or the raw "
                        "archives' folders); not needed for digits (default: none)")
    g.add_argument("--model", default=d["model"],
                   help="mlp, convnet_small, lenet_sigmoid, resnet18_cifar "
                        "(default: %(default)s)")
    g.add_argument("--device", default=d["device"],
                   help="torch device for local training (default: %(default)s)")
    # (argparse declarations: one line shape per flag, which the duplicate report pairs)
    g = parser.add_argument_group("federation")
    g.add_argument("--algorithm", default=d["algorithm"], choices=("fedsgd", "fedavg"),
                   help="fedsgd: one gradient per client per round; fedavg: local epochs, "
                        "clients send model deltas (default: %(default)s)")
    g.add_argument("--clients", type=int, default=d["clients"],
                   help="number of clients (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=d["rounds"],
                   help="communication rounds (default: %(default)s)")
    g.add_argument("--participation", type=float, default=d["participation"],
                   help="fraction of clients sampled per round (default: %(default)s)")
    g.add_argument("--split", default=d["split"], choices=("iid", "dirichlet"),
                   help="how the data is split across clients (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=d["alpha"],
                   help="Dirichlet concentration of --split dirichlet (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="local batch size (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d["lr"],
                   help="learning rate (default: %(default)s)")
    g.add_argument("--lr-steps", default="", metavar="ROUND:LR,...",
                   help="learning-rate steps, e.g. 100:0.01,140:0.005 (default: none)")
    g.add_argument("--momentum", type=float, default=d["momentum"],
                   help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="SGD weight decay (default: %(default)s)")
    g.add_argument("--local-epochs", type=int, default=d["local_epochs"],
                   help="local epochs per round, fedavg only (default: %(default)s)")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=d["seed"],
                       help="seed of the model, split, sampling, batches and compressors "
                            "(default: %(default)s)")
    seeds.add_argument("--seeds", default=None, metavar="SEEDS",
                       help="run every defense once per seed: a count (5 -> seeds 0..4) or a "
                            "comma list (0,1,2,3,4; 7, for the single seed 7); the summary gives "
                            "mean ± std over seeds and the paired difference to none "
                            "(default: one run, --seed)")
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="evaluate on the test split every this many rounds, and after the "
                        "last (default: %(default)s)")
    g.add_argument("--test-limit", type=int, default=d["test_limit"],
                   help="evaluate on at most this many test samples, 0 for all "
                        "(default: %(default)s)")


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

    from ..cli import default_out_dir, prepare_out_dir
    from .config import SimConfig, parse_defenses
    from .multiseed import parse_seeds
    from .results import plot_results, write_summary
    from .simulator import simulate

    specs = parse_defenses(args.defenses, "--defenses")
    defenses = [name for name, _ in specs]
    seeds = None if args.seeds is None else parse_seeds(args.seeds)  # errors name --seeds
    configs = []
    for name, params in specs:
        cfg = SimConfig(
            dataset=args.dataset, model=args.model, defense=name, defense_params=params,
            clients=args.clients, rounds=args.rounds, algorithm=args.algorithm,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, lr_steps=_parse_lr_steps(args.lr_steps),
            local_epochs=args.local_epochs, participation=args.participation, split=args.split,
            alpha=args.alpha, seed=args.seed, data_root=args.data_root, device=args.device,
            eval_every=args.eval_every, test_limit=args.test_limit, diagnostics=args.diagnostics,
            threads=args.threads,
        )
        configs.append(cfg.validate(FLAGS))  # every config checked before the first run starts
    out = prepare_out_dir(args.out or default_out_dir("train"), "--out")
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
