"""Command-line flags for the request parameters, derived from the parameter table (no torch: clients use it)."""

from __future__ import annotations

import argparse
from typing import Any

from flover_backend.param_table import PARAMS, Param


def add_sampling_arguments(parser: argparse.ArgumentParser, params: tuple[Param, ...] = PARAMS) -> None:
    """One flag per table parameter marked `cli`: --max-tokens, --temperature, ... (lists repeat the flag,
    booleans take --x / --no-x); left out, the engine's default holds."""
    for param in params:
        if not param.cli:
            continue
        flag = f"--{param.name.replace('_', '-')}"
        help_text = f"{param.doc} (default {param.default!r}{', ' + param.bounds if param.bounds else ''})"
        if param.kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif param.is_list:
            parser.add_argument(flag, type=param.kind, action="append", help=f"{help_text}; repeatable")
        else:
            parser.add_argument(flag, type=param.kind, default=None, help=help_text)


def sampling_values(args: argparse.Namespace, params: tuple[Param, ...] = PARAMS) -> dict[str, Any]:
    """The parameters the command line gave, by engine name (those left out are absent)."""
    return {p.name: getattr(args, p.name) for p in params if p.cli and getattr(args, p.name, None) is not None}
