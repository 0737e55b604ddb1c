"""The ``dgp`` command: wiring only; each subcommand lives in its own module.

Subcommands:
  bench   timing table of our ops vs the DGP authors' operator, topk and clone
          (dgp_kernels.benchmarks)

Add a subcommand: write ``add_arguments(parser)`` and ``run_from_args(args) -> int`` in the
module that owns the work, then register both in ``_SUBCOMMANDS`` below.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _bench_add(p: argparse.ArgumentParser) -> None:
    from . import benchmarks

    benchmarks.add_arguments(p)


def _bench_run(args: argparse.Namespace) -> int:
    from . import benchmarks

    return benchmarks.run_from_args(args)


# name -> (one-line help, add_arguments, run)
_SUBCOMMANDS = {
    "bench": (
        "time our band selection against the DGP authors' operator, a single topk and "
        "clone(), on a model's gradients and one large tensor",
        _bench_add,
        _bench_run,
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
