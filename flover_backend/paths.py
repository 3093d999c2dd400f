"""Where the project's files live: its checkout, and FLOVER_HOME for everything it writes (one default)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


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
