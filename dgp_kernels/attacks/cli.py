"""``dgp evaluate``: gradient inversion attacks against gradients shared under each defense.

Wiring only: the grid runs in :mod:`dgp_kernels.attacks.runner`, the report (markdown
tables, image grids, the privacy-utility-communication plot) is written by
:mod:`dgp_kernels.attacks.report`. Module imports are light (argparse only), so ``dgp --help``
stays fast and works without the ``eval`` extra; torch, scikit-image, matplotlib and the
simulator are imported when the command runs.

Examples::

    dgp evaluate                                   # built-in default, a few minutes on 2 CPU cores
    dgp evaluate --quick --no-utility              # smoke run (under a minute)
    dgp evaluate --defenses none "dgp:top=0.05,keep=0.2" "topk:keep=0.2" --attacks dlg ig-adaptive
    dgp evaluate --defenses none,dgp:top=0.1,topk      # the same comma lists as dgp train
    dgp evaluate --dataset cifar10 --data-root ~/data --images 8 --full --device cuda
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["add_arguments", "run_from_args"]

_DATASETS = ("photos", "digits", "mnist", "cifar10", "cifar100")
_MODELS = ("lenet_sigmoid", "convnet_small", "resnet18_cifar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``dgp evaluate`` options on ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Defense specs: 'none', 'dgp' (defaults top=0.05,keep=0.2), 'dgp:top=0.05,keep=0.2', "
        "'topk:keep=0.2', 'randk:keep=0.2', 'dp:sigma=0.01' (Gaussian noise of std sigma, no "
        "clipping unless clip= is given), 'qsgd:levels=8'. The attack side applies each one "
        "once, without error feedback, as the DGP paper's evaluation does. The same spec "
        "syntax as `dgp train --defenses`; a word may hold a comma list "
        "(none,dgp:top=0.1,keep=0.2).\n"
        "Attacks: dlg idlg ig dlg-adaptive ig-adaptive ig-dgp-aware rtf (or 'all')."
    )
    g = parser.add_argument_group("grid")
    g.add_argument("--defenses", nargs="+", metavar="SPEC", default=None,
                   help="defense specs, see below (default: none, DGP at two (top, keep) "
                        "points incl. the defaults, top-k 20%%, DP at two noise levels, qsgd; "
                        "--quick: none, dgp, topk:keep=0.2, dp:sigma=0.01)")
    g.add_argument("--attacks", nargs="+", metavar="NAME", default=None,
                   help="attack names or 'all' (default: every attack that differs on the "
                        "undefended, DGP-default and top-k 20%% rows; the strongest of each "
                        "family on the other defenses)")
    g.add_argument("--dataset", choices=_DATASETS, default="photos",
                   help="target images: scikit-image's bundled photos (default, offline), "
                        "scikit-learn's digits (offline), or MNIST/CIFAR from --data-root")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="directory holding MNIST/CIFAR files (torchvision layout or the "
                        "standard archives' contents); not needed for photos and digits "
                        "(default: none)")
    g.add_argument("--images", type=int, default=None, metavar="N",
                   help="number of target images (default 4: astronaut, chelsea, coffee, rocket; "
                        "--quick: 1)")
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="side of the (square) target images (default: 32 for photos, the "
                        "dataset's own size otherwise)")
    g.add_argument("--model", choices=_MODELS, default="lenet_sigmoid",
                   help="client model the gradient is computed on (default: DLG's sigmoid LeNet)")
    g.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="images per shared gradient (default 1, as in the papers' figures)")
    g.add_argument("--labels", choices=("known", "unknown"), default="known",
                   help="whether the attacker knows the labels (default known; iDLG and rtf "
                        "always infer them, and the iDLG label accuracy is reported either way)")

    # (argparse declarations: one line shape per flag, which the duplicate report pairs)
    b = parser.add_argument_group("budget")
    preset = b.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="smoke run: a quarter of the default iterations, one image, four "
                             "defenses, the reduced tuning grid, 30 simulator rounds")
    preset.add_argument("--full", action="store_true",
                        help="the literature's iteration counts (Inverting Gradients 24,000 "
                             "steps, DLG 300 L-BFGS steps): hours on a CPU, use --device cuda")
    b.add_argument("--iterations", type=float, default=None, metavar="SCALE",
                   help="multiply every attack's default iteration count by SCALE "
                        "(applied after --quick/--full) (default: 1)")
    b.add_argument("--device", default="auto",
                   help="torch device for the attacks: auto (cuda when available), cpu, cuda, "
                        "cuda:1 (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0,
                   help="seed of models, defenses and attacks (default: %(default)s)")
    b.add_argument("--threads", type=int, default=1,
                   help="torch threads while attacking (default 1: the attacked models are tiny "
                        "and more threads only wait on each other)")
    b.add_argument("--workers", type=int, default=0, metavar="P",
                   help="processes attacking images in parallel (default 0: one per CPU core, "
                        "at most one per image)")
    b.add_argument("--no-tuning", action="store_true",
                   help="run every attack once with its budget instead of its tuning grid")
    b.add_argument("--suite", action="store_true",
                   help="after the main run, also run batches of 4 and 8 photos, resnet18_cifar, "
                        "FedAvg updates (5 local steps) and unknown labels on the primary "
                        "defenses; writes suite.md (hours on a CPU)")

    o = parser.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR",
                   help="output folder, created before the run (default: "
                        "runs/evaluate-<UTC timestamp>)")
    o.add_argument("--no-utility", action="store_true",
                   help="skip the short simulator runs that give each defense's accuracy and "
                        "upload bytes for the privacy-utility-communication plot")
    o.add_argument("--utility-rounds", type=int, default=None, metavar="R",
                   help="FedSGD rounds per defense in the utility runs (default 100; the MLP on "
                        "the digits, ~3 s per defense)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(msg: str) -> int:
    print(f"dgp evaluate: error: {msg}", file=sys.stderr)
    return 2


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``dgp evaluate``; returns the process exit status (0 ok, 2 bad arguments)."""
    from ..cli import default_out_dir, prepare_out_dir
    from ..spec import split_specs
    from .report import format_summary, write_report
    from .runner import EvalConfig, default_config, run_evaluation

    try:
        defenses = None if args.defenses is None else split_specs(args.defenses)
        cfg = default_config(
            quick=bool(args.quick),
            full=bool(args.full),
            dataset=args.dataset,
            data_root=args.data_root,
            images=args.images,
            image_size=args.image_size,
            model=args.model,
            batch_size=args.batch_size,
            known_labels=args.labels == "known",
            defenses=defenses,
            attacks=_split_attacks(args.attacks),
            iteration_scale=args.iterations,
            device=args.device,
            seed=args.seed,
            utility=not args.no_utility,
            utility_rounds=args.utility_rounds,
            threads=args.threads,
            workers=args.workers,
            tuning=not args.no_tuning,
        )
        out = prepare_out_dir(args.out or default_out_dir("evaluate"), "--out")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        return _fail(str(exc))
    assert isinstance(cfg, EvalConfig)
    progress = not args.no_progress
    try:
        # The simulator is wired in here: the attacks package does not import it.
        from ..sim import simulate_defense

        result = run_evaluation(cfg, progress=progress, trainer=simulate_defense)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    paths = write_report(result, out, progress=progress)
    print(format_summary(result))
    if args.suite:
        from .report import write_suite_report
        from .runner import run_suite, suite_configs

        suite = run_suite(suite_configs(cfg), progress=progress)
        print(f"suite: {write_suite_report(suite, out)}")
    print(f"\nreport: {paths.report}")
    print(f"results: {paths.json}  {paths.csv}")
    for p in paths.images:
        print(f"figure: {p}")
    return 0


def _split_attacks(names: Optional[List[str]]) -> Optional[List[str]]:
    """``--attacks`` values, also accepting comma-separated lists; ``None`` keeps the default."""
    if names is None:
        return None
    out: List[str] = []
    for n in names:
        out.extend(x.strip() for x in n.split(",") if x.strip())
    return out
