"""A dead or unloaded backend is found and reloaded; a launcher that dies takes tritonserver with it."""

from __future__ import annotations

import os
import signal
import subprocess
import types
import urllib.request
from pathlib import Path

import pytest

from flover_backend.ports import server_ports
from flover_backend.server import watchdog as watchdog_module
from flover_backend.server.serve import TritonServer
from flover_backend.server.watchdog import (
    StallDetector,
    Stub,
    Watchdog,
    WatchdogGaveUp,
    find_stubs,
    parse_metric,
)
from flover_backend.triton_env import SHM_DIR
from tests.echo_server import launch_cli, write_repository
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
    restarts = 0

    def poll(self):
        return None

    def model_names(self):
        if not self.answering:
            raise TimeoutError("timed out")
        return ["echo"]

    def restart(self):
        self.restarts += 1


def test_a_stub_that_died_while_the_server_did_not_answer_is_still_recovered(monkeypatch):
    stubs = [Stub(pid=4242, model="echo", shm_region="flover-test-none")]
    monkeypatch.setattr(watchdog_module, "find_stubs", lambda server_pid, include_dead=False: list(stubs))
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
    assert watchdog.check() == ["echo"] and server.restarts == 1  # its model was still loaded: a restart


@pytest.mark.triton
def test_killed_backend_is_found_and_reloaded_then_the_watchdog_gives_up(tmp_path):
    repo = write_repository(tmp_path / "repo")
    with TritonServer(repo, log_path=tmp_path / "server.log", ready_timeout_s=120, **server_ports()) as server:
        watchdog = Watchdog(server, max_restarts=2)
        assert watchdog.check() == []
        (stub,) = find_stubs(server.process.pid)
        assert stub.model == "echo" and (SHM_DIR / stub.shm_region).exists()
        os.kill(stub.pid, signal.SIGKILL)
        assert echo_ready(server)  # tritonserver itself does not notice
        assert wait_for(lambda: not find_stubs(server.process.pid))
        assert watchdog.backend_died()
        first_server = server.process.pid
        assert watchdog.check() == ["echo"]
        # Restarted: only that ends the requests the dead stub left in flight (test_dead_backend.py).
        assert server.process.pid != first_server and not watchdog.backend_died()
        (new_stub,) = find_stubs(server.process.pid)
        assert new_stub.pid != stub.pid and echo_ready(server)
        assert not (SHM_DIR / stub.shm_region).exists()  # the dead stub's shared memory is gone
        assert watchdog.check() == []

        # An engine that died unloads its model: the watchdog loads it again.
        unload = urllib.request.Request(f"{server.http_url}/v2/repository/models/echo/unload", data=b"{}",
                                        method="POST", headers=server.admin_headers)
        urllib.request.urlopen(unload, timeout=60).close()
        assert wait_for(lambda: not echo_ready(server))
        second_server = server.process.pid
        assert watchdog.check() == ["echo"] and echo_ready(server)
        assert server.process.pid == second_server  # loaded again, not restarted: nothing was left in flight

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
                      **server_ports()):
        assert not any(region.exists() for region in regions)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class FakeServer:
    """What the watchdog asks of a server, scripted: loaded models, a metrics page, and what it was told to do."""

    def __init__(self, loaded: list[str]):
        self.loaded, self.page, self.actions = loaded, "", []
        self.process = type("Process", (), {"pid": 1})()
        self.exit_code: int | None = None

    def poll(self) -> int | None:
        return self.exit_code

    def model_names(self) -> list[str]:
        return list(self.loaded)

    def restart(self) -> None:
        self.actions.append("restart")
        self.exit_code = None


def test_a_server_that_exited_on_its_own_is_started_again_within_the_recovery_bound(monkeypatch):
    """tritonserver aborts by itself when a stub dies holding a shared-memory lock: the watchdog starts it again
    at once (urgent, without waiting for the interval), counted like any recovery."""
    stub = Stub(pid=os.getpid(), model="m", shm_region="flover-test-none")  # a live process stands for it
    monkeypatch.setattr(watchdog_module, "find_stubs", lambda server_pid, include_dead=False: [stub])
    server = FakeServer(["m"])
    watchdog = Watchdog(server, max_restarts=2)
    monkeypatch.setattr(watchdog, "_metrics", lambda: server.page)
    assert not watchdog.urgent() and watchdog.check() == []
    for _ in range(2):
        server.exit_code = -6
        assert watchdog.urgent(backing_off=True)  # even while probes fail and back off
        assert watchdog.check() == ["m"] and server.poll() is None
    server.exit_code = -6
    with pytest.raises(WatchdogGaveUp, match="exited with code -6"):
        watchdog.check()
    assert server.actions == ["restart", "restart"]


@pytest.mark.parametrize("loaded, action", [(["m"], "restart"), ([], "load")])
def test_a_stub_gone_with_its_model_still_loaded_restarts_the_server_else_the_model_is_loaded(
        monkeypatch, loaded, action):
    """Only a restart ends the requests a killed stub left in flight; a stub that ended with its model's
    unload left none, so loading the model again is enough."""
    server = FakeServer(["m"])
    stubs = [Stub(101, "m", "region")]
    monkeypatch.setattr("flover_backend.server.watchdog.find_stubs", lambda pid, include_dead=False: list(stubs))
    watchdog = Watchdog(server)
    monkeypatch.setattr(watchdog, "_metrics", lambda: server.page)
    monkeypatch.setattr(watchdog, "_reload", lambda model: server.actions.append("load"))
    assert watchdog.check() == [] and server.actions == []
    stubs.clear()
    server.loaded = loaded
    assert watchdog.check() == ["m"] and server.actions == [action]


def test_a_stalled_model_restarts_the_server_and_recoveries_are_bounded(monkeypatch):
    server = FakeServer(["m"])
    stub = Stub(pid=os.getpid(), model="m", shm_region="flover-test-none")  # alive: the model is stalled, not dead
    monkeypatch.setattr("flover_backend.server.watchdog.find_stubs", lambda pid, include_dead=False: [stub])
    watchdog = Watchdog(server, stall_s=0.0, max_restarts=2)
    monkeypatch.setattr(watchdog, "_metrics", lambda: server.page)
    server.page = 'flover_requests_running{model="m"} 2\nflover_iterations_total{model="m"} 7\n'
    assert watchdog.check() == []  # the first reading starts the clock
    assert watchdog.check() == ["m"] and server.actions == ["restart"]
    watchdog.check()
    assert watchdog.check() == ["m"] and server.actions == ["restart"] * 2
    watchdog.check()
    with pytest.raises(WatchdogGaveUp, match="no iteration"):
        watchdog.check()


def test_a_stub_dead_before_the_watchdog_first_looked_is_recovered(monkeypatch):
    """A stub killed while stopped stays a zombie (tritonserver does not reap it): the watchdog built after
    that death must still see a dead backend, not no backend at all."""
    zombie = Stub(pid=4242, model="m", shm_region="flover-test-none")
    monkeypatch.setattr(watchdog_module, "find_stubs",
                        lambda server_pid, include_dead=False: [zombie] if include_dead else [])
    monkeypatch.setattr(watchdog_module, "_alive", lambda pid: False)
    server = FakeServer(["m"])
    watchdog = Watchdog(server)
    monkeypatch.setattr(watchdog, "_metrics", lambda: server.page)
    assert watchdog.urgent()
    assert watchdog.check() == ["m"] and server.actions == ["restart"]


def test_a_loaded_model_without_any_backend_process_is_recovered(monkeypatch):
    """A stub that died and was reaped before the watchdog ever saw it leaves a READY model with no backend:
    that model is broken too (its requests in flight hang), so the server restarts."""
    monkeypatch.setattr(watchdog_module, "find_stubs", lambda server_pid, include_dead=False: [])
    server = FakeServer(["m"])
    watchdog = Watchdog(server)
    monkeypatch.setattr(watchdog, "_metrics", lambda: server.page)
    assert watchdog.check() == ["m"] and server.actions == ["restart"]
