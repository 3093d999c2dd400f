"""Where the project's files live: its checkout, and FLOVER_HOME for everything it writes (one default)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_PREFIX = "builtin:"  # `builtin:<name>` names a built-in checkpoint instead of a directory


def flover_home() -> Path:
    """$FLOVER_HOME; else `.cache/flover` in a checkout (git-ignored), else ~/.cache/flover."""
    if os.environ.get("FLOVER_HOME"):
        return Path(os.environ["FLOVER_HOME"]).expanduser()
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / ".cache" / "flover"
    return Path.home() / ".cache" / "flover"


def kernels_dir() -> Path:
    """Where the C kernels are compiled to, once per machine and source."""
    return flover_home() / "kernels"


def builtin_dir(name: str) -> Path:
    """Where the built-in checkpoint `name` is written on first use (execution.models.builtin writes it)."""
    return flover_home() / "builtin" / name


def checkpoint_dir(spec: str) -> Path:
    """The directory a model spec names, without writing anything: light callers (the OpenAI front) read it."""
    return builtin_dir(spec[len(BUILTIN_PREFIX):]) if spec.startswith(BUILTIN_PREFIX) else Path(spec).expanduser()
