"""A Python stub killed mid-stream under `flover serve`: every request in flight ends with an error within
seconds on every protocol (Triton HTTP and gRPC streams, the OpenAI front streamed and whole), readiness
is false from then until the model is back, and then every protocol serves again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from clients.triton_stream import GrpcStream, ServerError, stream_http
from flover_backend.ports import free_ports
from flover_backend.server.watchdog import find_stubs, parse_metric
from flover_backend.triton_env import PROJECT_ROOT
from tests.waiting import wait_for

pytestmark = pytest.mark.triton
# The tiny model's whole context: a request of 1000 tokens is still running when the stub is stopped a
# few 0.1 s metric ticks after all four requests are seen running, however fast the machine.
SETTINGS = {"model": "builtin:tiny", "max_model_len": "1024", "num_threads": "1"}
MAX_TOKENS = 1000
ERROR_BOUND_S = 30.0  # generous, but far below the clients' own 300 s timeouts: an answer, not a timeout
PROTOCOLS = ("triton_http", "triton_grpc", "openai_stream", "openai_whole")


def status(url: str) -> int | None:
    """The HTTP status `url` answers a GET with; None when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


def tritonserver_of(launcher: int) -> int | None:
    for pid in children(launcher):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                return pid
        except FileNotFoundError:
            continue
    return None


def kill_groups(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher's group and the groups of its servers (each runs in a session of its own)."""
    for pid in [*children(launcher.pid), launcher.pid]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    launcher.wait(timeout=30)


class Outcomes:
    """How each request in flight ended (its error text, or 'completed'), when, and whether it had started."""

    def __init__(self):
        self.ended: dict[str, tuple[float, str]] = {}
        self.started: set[str] = set()

    def run(self, name: str, request) -> threading.Thread:
        def target():
            try:
                request(lambda: self.started.add(name))
                result = "completed"
            except Exception as error:  # noqa: BLE001 - every failure is the outcome under test
                result = f"{type(error).__name__}: {error}"
            self.ended[name] = (time.monotonic(), result)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread


def triton_http(url: str, started) -> None:
    for _ in stream_http(url, "flover", text_input="http", max_tokens=MAX_TOKENS, ignore_eos=True):
        started()


def triton_grpc(url: str, started) -> None:
    for _ in GrpcStream(url, "flover", {"text_input": "grpc", "max_tokens": MAX_TOKENS, "ignore_eos": True}):
        started()


def openai_stream(url: str, started) -> None:
    body = {"model": "flover", "prompt": "stream", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise ServerError(event["error"]["message"])
                started()


def openai_whole(url: str, started) -> None:
    body = {"model": "flover", "prompt": "whole", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    if reply.status_code != 200:
        raise ServerError(f"{reply.status_code} {reply.json()['error']['message']}")


class ReadinessLog:
    """Polls readiness URLs every 50 ms from a thread, keeping each one's statuses in order."""

    def __init__(self, urls: list[str]):
        self.seen: dict[str, list[int | None]] = {url: [] for url in urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            for url, statuses in self.seen.items():
                statuses.append(status(url))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def runs(statuses: list[int | None]) -> list[bool]:
    """Ready (200) or not, collapsed to runs: [True, False, True] is ready, then not, then ready again."""
    collapsed: list[bool] = []
    for code in statuses:
        if not collapsed or collapsed[-1] != (code == 200):
            collapsed.append(code == 200)
    return collapsed


def test_killed_stub_ends_every_request_in_flight_and_readiness_is_false_until_back(tmp_path, builtin_home):
    ports = {}
    while len(set(ports.values())) < 4:
        ports = free_ports("http-port", "grpc-port", "metrics-port", "openai-port")
    args = [f"--{name}={port}" for name, port in ports.items()]
    args += [f"--set={key}={value}" for key, value in SETTINGS.items()]
    http, grpc = f"http://127.0.0.1:{ports['http-port']}", f"127.0.0.1:{ports['grpc-port']}"
    front, metrics = f"http://127.0.0.1:{ports['openai-port']}", f"http://127.0.0.1:{ports['metrics-port']}/metrics"
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "flover_backend", "serve", "--models", "flover", *args],
                                    cwd=PROJECT_ROOT, env={**os.environ, "FLOVER_HOME": str(builtin_home)},
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: status(f"{front}/health") == 200, timeout_s=300), (tmp_path / "launcher.log").read_text()
        (stub,) = find_stubs(tritonserver_of(launcher.pid))

        outcomes = Outcomes()
        threads = [outcomes.run("triton_http", lambda started: triton_http(http, started)),
                   outcomes.run("triton_grpc", lambda started: triton_grpc(grpc, started)),
                   outcomes.run("openai_stream", lambda started: openai_stream(front, started)),
                   outcomes.run("openai_whole", lambda started: openai_whole(front, started))]

        def all_running() -> bool:
            page = urllib.request.urlopen(metrics, timeout=10).read().decode()
            return (len(outcomes.started) == 3
                    and parse_metric(page, "flover_requests_running").get("flover") == len(PROTOCOLS))

        assert wait_for(all_running, timeout_s=120)
        os.kill(stub.pid, signal.SIGSTOP)  # frozen mid-generation: no request can finish before it dies
        assert not outcomes.ended, outcomes.ended
        readiness = ReadinessLog([f"{http}/v2/health/ready", f"{http}/v2/models/flover/ready", f"{front}/health"])
        killed_at = time.monotonic()
        os.kill(stub.pid, signal.SIGKILL)

        for thread in threads:
            thread.join(timeout=killed_at + ERROR_BOUND_S + 5 - time.monotonic())
        after = {name: (round(outcomes.ended[name][0] - killed_at, 2), outcomes.ended[name][1])
                 for name in PROTOCOLS if name in outcomes.ended}
        print("kill -> end of each request in flight (s, outcome):", json.dumps(after, indent=1))
        assert set(after) == set(PROTOCOLS), after
        for name, (seconds, outcome) in after.items():
            assert seconds < ERROR_BOUND_S and outcome.startswith("ServerError"), (name, seconds, outcome)
        assert "503" in after["openai_whole"][1] and "unavailable" in after["openai_stream"][1]

        assert wait_for(lambda: all(status(url) == 200 for url in readiness.seen), timeout_s=300)
        time.sleep(0.5)  # a few more readings: once back, it stays back
        readiness.stop()
        for url, statuses in readiness.seen.items():
            # Ready until the death is seen (at most), then not ready throughout the restart, then ready.
            assert runs(statuses) in ([False, True], [True, False, True]), (url, statuses)

        # Serving again on every protocol.
        assert [c.finish_reason for c in stream_http(http, "flover", text_input="again", max_tokens=3, ignore_eos=True)][-1] == "length"
        assert [c.finish_reason for c in GrpcStream(grpc, "flover", {"text_input": "again", "max_tokens": 3, "ignore_eos": True})][-1] == "length"
        reply = httpx.post(f"{front}/v1/completions", json={"model": "flover", "prompt": "again", "max_tokens": 3, "ignore_eos": True},
                           timeout=120)
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
        assert launcher.poll() is None
    finally:
        kill_groups(launcher)
