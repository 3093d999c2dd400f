"""The stub process's Python logging: flover's loggers to stderr (tritonserver's log) at the chosen level."""

from __future__ import annotations

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str, instance: str) -> None:
    """Send the `flover_backend` loggers' records at `level` and above to stderr, each line naming `instance`.

    Each model instance is a stub process of its own, so this sets that process's logging once, at start.
    """
    if level not in LEVELS:
        raise ValueError(f"log_level must be one of {sorted(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    instance = instance.replace("%", "%%")  # the format string is %-style
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {instance} %(name)s: %(message)s"))
    package = logging.getLogger("flover_backend")
    package.handlers = [handler]
    package.setLevel(LEVELS[level])
    package.propagate = False  # the stub's root logger may have a handler of its own: one line per record
