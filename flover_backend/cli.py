"""The `flover` command: a thin dispatcher; each subcommand lives in the module that implements it."""

from __future__ import annotations

import argparse

from flover_backend.engine import offline
from flover_backend.server import serve


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered by its own module."""
    parser = argparse.ArgumentParser(prog="flover", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    # Each registration adds its arguments and sets `run` to the function that executes it.
    serve.add_serve_command(subparsers)
    generate = subparsers.add_parser("generate", help="stream one completion from an in-process engine")
    offline.add_arguments(generate)
    generate.set_defaults(run=offline.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the chosen subcommand; return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)
