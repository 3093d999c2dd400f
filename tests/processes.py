"""Servers that tests start: each in a session of its own, killed with all it started whatever the test did."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

# Command-line words of the processes a test may leave behind: tritonserver and its Python stubs, the
# launcher (`-m flover_backend serve`), the OpenAI front and tensor-parallel workers.
SERVER_WORDS = (b"tritonserver", b"triton_python_backend_stub", b"flover_backend")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """State, parent and process group of `pid`, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _live_parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    return parents


def descendants(pid: int) -> list[int]:
    """The live processes below `pid`: its children, theirs, and so on."""
    parents = _live_parents()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, everything below it, and every process group among them but the caller's.

    Everything is stopped first, so nothing forks a process that escapes; groups too, since a server's
    children may have been reparented away from it (tritonserver's stubs once it has exited).
    """
    own_group = os.getpgrp()
    frozen: list[int] = []
    while tree := [p for p in [pid, *descendants(pid)] if p not in frozen and _stat(p)]:
        for member in tree:
            _signal(member, signal.SIGSTOP)
        frozen += tree
    for group in {stat[2] for p in frozen if (stat := _stat(p))} - {own_group}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for member in frozen:
        _signal(member, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@contextlib.contextmanager
def spawned(command: list[str], **popen_args):
    """`with spawned([...]) as process:` a Popen in its own session, killed with its whole tree at the end."""
    process = subprocess.Popen(command, start_new_session=True, **popen_args)
    try:
        yield process
    finally:
        if process.returncode is None:  # not reaped yet, so its pid is still its own (if only as a zombie)
            kill_tree(process.pid)
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def server_children() -> set[int]:
    """Live children of this process whose command line names a server (SERVER_WORDS)."""
    children = set()
    for child, parent in _live_parents().items():
        if parent != os.getpid():
            continue
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if any(word in argv for word in SERVER_WORDS):
            children.add(child)
    return children
