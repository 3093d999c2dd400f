"""A dead or unloaded backend is found and reloaded; a launcher that dies takes tritonserver with it."""

from __future__ import annotations

import os
import signal
import subprocess
import types
import urllib.request
from pathlib import Path

import pytest

from flover_backend import watchdog as watchdog_module
from flover_backend.serve import TritonServer
from flover_backend.triton_env import SHM_DIR
from flover_backend.watchdog import StallDetector, Stub, Watchdog, WatchdogGaveUp, find_stubs, parse_metric
from tests.echo_server import free_ports, launch_cli, write_repository
from tests.waiting import wait_for


def echo_ready(server) -> bool:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/echo/ready", timeout=10) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_stall_detector_needs_running_requests_and_no_progress_for_the_whole_time():
    stalls = StallDetector(stall_s=10)
    assert not stalls.stalled("m", running=2, iterations=5, now=0)
    assert not stalls.stalled("m", running=2, iterations=5, now=9)
    assert stalls.stalled("m", running=2, iterations=5, now=10)
    assert not stalls.stalled("m", running=2, iterations=6, now=11)  # progress restarts the clock
    assert not stalls.stalled("m", running=0, iterations=6, now=30)  # idle is not stuck
    assert not stalls.stalled("m", running=1, iterations=6, now=35)
    assert stalls.stalled("m", running=1, iterations=6, now=45)


def test_parse_metric_sums_per_model():
    page = ('flover_requests_running{model="a",version="1"} 2\n'
            'flover_requests_running{model="b",version="1"} 0\n'
            'flover_requests_running{model="a",version="2"} 1\n'
            'flover_requests_runningx{model="a"} 9\n')
    assert parse_metric(page, "flover_requests_running") == {"a": 3.0, "b": 0.0}


class UnansweringServer:
    """A server whose model index times out while `answering` is False (out of descriptors, say)."""

    process = types.SimpleNamespace(pid=1)
    http_url, metrics_url, admin_headers = "http://127.0.0.1:1", "http://127.0.0.1:1/metrics", {}
    answering = True

    def model_names(self):
        if not self.answering:
            raise TimeoutError("timed out")
        return ["echo"]


def test_a_stub_that_died_while_the_server_did_not_answer_is_still_reloaded(monkeypatch):
    stubs = [Stub(pid=4242, model="echo", shm_region="flover-test-none")]
    monkeypatch.setattr(watchdog_module, "find_stubs", lambda server_pid: list(stubs))
    monkeypatch.setattr(watchdog_module, "_kill", lambda pid: None)
    loads = []
    monkeypatch.setattr(Watchdog, "_load", lambda self, model: loads.append(model))
    server = UnansweringServer()
    watchdog = Watchdog(server)
    assert watchdog.check() == []
    stubs.clear()  # the stub dies while the server does not answer: that probe fails
    server.answering = False
    with pytest.raises(TimeoutError):
        watchdog.check()
    server.answering = True
    assert watchdog.check() == ["echo"] and loads == ["echo"]


@pytest.mark.triton
def test_killed_backend_is_found_and_reloaded_then_the_watchdog_gives_up(tmp_path):
    repo = write_repository(tmp_path / "repo")
    with TritonServer(repo, log_path=tmp_path / "server.log", ready_timeout_s=120, **free_ports()) as server:
        watchdog = Watchdog(server, max_restarts=2)
        assert watchdog.check() == []
        (stub,) = find_stubs(server.process.pid)
        assert stub.model == "echo" and (SHM_DIR / stub.shm_region).exists()
        os.kill(stub.pid, signal.SIGKILL)
        assert echo_ready(server)  # tritonserver itself does not notice
        assert wait_for(lambda: not find_stubs(server.process.pid))
        assert watchdog.check() == ["echo"]
        (new_stub,) = find_stubs(server.process.pid)
        assert new_stub.pid != stub.pid and echo_ready(server)
        assert not (SHM_DIR / stub.shm_region).exists()  # the dead stub's shared memory is gone
        assert watchdog.check() == []

        # An engine that died unloads its model: the watchdog loads it again.
        unload = urllib.request.Request(f"{server.http_url}/v2/repository/models/echo/unload", data=b"{}",
                                        method="POST", headers=server.admin_headers)
        urllib.request.urlopen(unload, timeout=60).close()
        assert wait_for(lambda: not echo_ready(server))
        assert watchdog.check() == ["echo"] and echo_ready(server)

        os.kill(find_stubs(server.process.pid)[0].pid, signal.SIGKILL)  # a third failure within the window
        assert wait_for(lambda: not find_stubs(server.process.pid))
        with pytest.raises(WatchdogGaveUp, match="echo"):
            watchdog.check()


@pytest.mark.triton
def test_launcher_killed_takes_tritonserver_and_the_next_launch_clears_its_shared_memory(tmp_path):
    with launch_cli(tmp_path, stderr=subprocess.DEVNULL) as (cli, _):
        try:
            for line in cli.stdout:
                if line.startswith("Ctrl-C"):
                    break
            (server_pid,) = [int(p) for p in subprocess.run(["pgrep", "-P", str(cli.pid)], capture_output=True,
                                                            text=True, check=True).stdout.split()]
            regions = list(SHM_DIR.glob(f"flover-{cli.pid}-*"))
            assert regions
        finally:
            cli.kill()  # SIGKILL: the launcher gets no chance to clean up
            cli.wait(timeout=30)
        assert wait_for(lambda: not Path(f"/proc/{server_pid}").exists() or _is_zombie(server_pid))
    with TritonServer(write_repository(tmp_path / "repo2"), log_path=tmp_path / "server.log", ready_timeout_s=120,
                      **free_ports()):
        assert not any(region.exists() for region in regions)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
