"""The tests' process helper: a spawned server dies with everything it started, whatever the test raised."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.processes import _stat, descendants, server_children, spawned
from tests.waiting import wait_for

# Starts a grandchild in a session of its own (as the launcher starts tritonserver), then waits.
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(120)"])
print("up", flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] == "Z"


def test_spawned_kills_the_whole_tree_when_the_block_raises():
    with pytest.raises(RuntimeError, match="the test failed"), \
            spawned([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline() == "up\n"
        (grandchild,) = wait_for(lambda: descendants(process.pid))
        assert _stat(process.pid)[2] == process.pid  # a group (and session) of its own
        raise RuntimeError("the test failed")
    assert process.returncode == -9
    assert wait_for(lambda: gone(grandchild))


def test_server_children_names_only_servers():
    with spawned([sys.executable, "-c", "import time; time.sleep(120)", "flover_backend"]) as server, \
            spawned([sys.executable, "-c", "import time; time.sleep(120)"]) as other:
        assert server.pid in server_children() and other.pid not in server_children()
