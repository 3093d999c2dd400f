"""Building a kernel's C source into a shared library once per machine, cached by source, flags and CPU."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# -march=native: a library is built on, and cached for, the machine that runs it (the key holds its CPU flags).
# -fopenmp: the process's OpenMP runtime is torch's own libgomp (already loaded, same soname), so a kernel's
# parallel loops share torch's threads.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def library_path(source: Path, build_dir: Path) -> Path:
    """Where `source` (with the headers beside it), built with FLAGS for this CPU, is cached under `build_dir`."""
    text = source.read_bytes() + b"".join(header.read_bytes() for header in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    return build_dir / f"{source.stem}-{key}.so"


def _build(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    # Built beside the target and renamed onto it: processes starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        built.replace(target)


def declare(function: ctypes._CFuncPtr, argtypes: list, restype: type | None = None) -> ctypes._CFuncPtr:
    """`function` with its C signature set, so ctypes converts and checks every argument of each call."""
    function.restype, function.argtypes = restype, argtypes
    return function


@functools.cache
def load_library(source: Path, build_dir: Path) -> ctypes.CDLL | None:
    """`source` built into `build_dir` on first use and loaded; None (logged once) where it cannot be."""
    target = library_path(source, build_dir)
    try:
        if not target.exists():
            _build(source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("the CPU kernel %s is unavailable (%s); using torch's operators instead", source.name, detail)
        return None
