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

Conventions every subcommand follows: defenses are given as specs (``dgp:top=0.1``,
:mod:`dgp_kernels.spec`); every option's help states its default; errors name the flag and
exit with status 2 before any work starts; the output folder is checked and created
(:func:`prepare_out_dir`) before the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

__all__ = ["build_parser", "default_out_dir", "main", "prepare_out_dir"]


def default_out_dir(command: str) -> str:
    """``runs/<command>-<UTC timestamp>``: the default output folder of a subcommand."""
    return os.path.join("runs", f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")


def prepare_out_dir(path: str, flag: str = "--out") -> str:
    """Create the output folder ``path`` (and its parents) and check that a file can be
    written in it, before a run that may take minutes. Raises ``ValueError`` naming ``flag``
    when it cannot be created or written; returns ``path``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {path!r}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path!r}: cannot write in the folder ({exc.strerror or exc})") from None
    return path


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
