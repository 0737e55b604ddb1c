"""The ``dgp`` command: wiring only; each subcommand lives in its own module.

Subcommands:
  evaluate  gradient inversion attacks against each defense; report, tables, pictures
            (dgp_kernels.attacks.cli) -- the package's main job
  train     collaborative-learning simulator: accuracy and bytes per defense
            (dgp_kernels.sim.cli)
  bench     timing table of our ops vs the DGP authors' operator, topk and clone
            (dgp_kernels.speed)

Add a subcommand: write ``add_arguments(parser)`` and ``run_from_args(args) -> int`` in the
module that owns the work, then register both in ``_SUBCOMMANDS`` below.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _lazy(module: str):
    """(add_arguments, run) that import ``module`` only when that subcommand is used."""
    import importlib

    def add(p: argparse.ArgumentParser) -> None:
        importlib.import_module(module, __package__).add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module, __package__).run_from_args(args)

    return add, run


# name -> (one-line help, add_arguments, run)
_SUBCOMMANDS = {
    "evaluate": (
        "run gradient inversion attacks against gradients shared under each defense and "
        "write the privacy-utility-communication report",
        *_lazy(".attacks.cli"),
    ),
    "train": (
        "simulate collaborative learning (FedSGD/FedAvg) under each defense: accuracy and "
        "upload/download bytes per round",
        *_lazy(".sim.cli"),
    ),
    "bench": (
        "time our band selection against the DGP authors' operator, a single topk and "
        "clone(), on a model's gradients and one large tensor",
        *_lazy(".speed"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgp", description="Fast, exact Dual Gradient Pruning (DGP) for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, run) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args._run(args)


if __name__ == "__main__":
    raise SystemExit(main())
