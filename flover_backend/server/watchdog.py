"""Supervision of a running tritonserver: a model whose backend died or wedged is recovered, or the launcher gives up.

tritonserver 2.51 keeps a model READY when its Python backend process is killed (by the kernel's OOM
killer, say): every new request then fails with "Stub process is not healthy" while every health endpoint
answers 200, and the requests that were in flight never end: the dead stub held their response senders,
and neither Triton nor an unload of the model finishes them. The watchdog looks at what the server does
not: the stub processes themselves (Linux /proc), whether a model that has requests running still makes
iterations (its own metrics), and whether a model it was started with is still loaded (an engine that
died unloads its model). A dead or wedged backend costs a restart of tritonserver, the only thing that
ends its requests (their connections close, so every client gets an error); a model that unloaded
itself is loaded again through the admin API. Past `max_restarts` recoveries within `restart_window_s`
it gives up, so the launcher exits non-zero and the orchestrator replaces the whole server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from flover_backend.triton_env import SHM_DIR, STUB

logger = logging.getLogger(__name__)
PROC = Path("/proc")


@dataclass(frozen=True)
class Stub:
    """One Python-backend process of the server: whose model instance it runs and its shared memory."""

    pid: int
    model: str
    shm_region: str


def find_stubs(server_pid: int, include_dead: bool = False) -> list[Stub]:
    """The Python-backend stub processes tritonserver `server_pid` has started: the live ones, and with
    `include_dead` the zombies too (dead, not yet reaped)."""
    stubs = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = _state_and_parent(entry)
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited while we looked
        # argv: stub, <repository>/<model>/<version>/model.py, shm region name, ...
        if ppid != server_pid or (state == "Z" and not include_dead) or len(argv) < 3 or not argv[0].endswith(STUB.encode()):
            continue
        stubs.append(Stub(int(entry.name), Path(os.fsdecode(argv[1])).parents[1].name, os.fsdecode(argv[2])))
    return stubs


def _state_and_parent(proc_dir: Path) -> tuple[str, int]:
    """A process's state letter and parent pid, from /proc/<pid>/stat (the name may hold spaces or ')')."""
    fields = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def parse_metric(text: str, name: str) -> dict[str, float]:
    """`name`'s value per model label on a Prometheus metrics page (summed over other labels)."""
    values: dict[str, float] = {}
    for labels, value in re.findall(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        model = re.search(r'model="([^"]*)"', labels)
        if model:
            values[model[1]] = values.get(model[1], 0.0) + float(value)
    return values


class StallDetector:
    """Tells a wedged model: requests running, yet no iteration finished for `stall_s` seconds."""

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self._progress: dict[str, tuple[float, float]] = {}  # model -> (iterations seen, when they last moved)

    def stalled(self, model: str, running: float, iterations: float, now: float) -> bool:
        """Feed one reading of a model's metrics; True when it has been stuck for stall_s."""
        seen = self._progress.get(model)
        if running <= 0 or seen is None or iterations != seen[0]:
            self._progress[model] = (iterations, now)
            return False
        return now - seen[1] >= self.stall_s

    def forget(self, model: str) -> None:
        """Start afresh after the model was reloaded."""
        self._progress.pop(model, None)


@dataclass(frozen=True)
class Fault:
    """Why a model is broken, and whether recovering it takes a restart of tritonserver (requests stuck in it)."""

    why: str
    restart: bool


class Watchdog:
    """Checks a `TritonServer`'s models every call to `check`, recovering the broken ones."""

    def __init__(self, server, stall_s: float = 120.0, max_restarts: int = 3, restart_window_s: float = 600.0,
                 load_timeout_s: float = 600.0):
        self.server = server
        self.models = server.model_names()  # what the server was started with: what must stay served
        self.max_restarts, self.restart_window_s, self.load_timeout_s = max_restarts, restart_window_s, load_timeout_s
        self.stalls = StallDetector(stall_s)
        self.restarts: deque[float] = deque()
        # Zombies too: a stub that died before the watchdog first looked (tritonserver does not reap one that
        # was stopped when killed) is a dead backend to recover, not nothing.
        self._stubs = {stub.pid: stub for stub in find_stubs(server.process.pid, include_dead=True)}
        self._dead_stubs: list[Stub] = []

    def backend_died(self) -> bool:
        """Whether a stub the last check saw has exited since: a few /proc reads, cheap enough to ask every second."""
        return not all(_alive(pid) for pid in self._stubs)

    def urgent(self, backing_off: bool = False) -> bool:
        """Whether to check before the next interval: tritonserver exited, or (unless probes are failing and
        backing off) a stub died."""
        return self.server.poll() is not None or (not backing_off and self.backend_died())

    def check(self) -> list[str]:
        """Find the broken models and recover them; the ones recovered. Raises WatchdogGaveUp past the limit."""
        code = self.server.poll()
        # tritonserver can abort on its own when a stub dies holding a shared-memory lock (boost lock_exception):
        # its models' requests are gone with it, so it is started again, counted like any other recovery.
        broken = ({model: Fault(f"tritonserver exited with code {code}", restart=True) for model in self.models}
                  if code is not None else self._broken_models())
        if not broken:
            return []
        self._count_recovery(broken)
        for model, fault in broken.items():
            logger.error("model %r is broken: %s; %s", model, fault.why,
                         "restarting tritonserver" if fault.restart else "reloading it")
        if any(fault.restart for fault in broken.values()):
            # Readiness is false from here until every model is back: the server is down, then loading.
            self.server.restart()
        else:
            for model in broken:
                self._reload(model)
        self._stubs = {stub.pid: stub for stub in find_stubs(self.server.process.pid)}
        for model in broken:
            self.stalls.forget(model)
            logger.warning("model %r is serving again", model)
        return sorted(broken)

    def _broken_models(self) -> dict[str, Fault]:
        """Each unhealthy model and why."""
        now = time.monotonic()
        # The server first: when it does not answer (the caller counts a failed probe and tries again), the
        # stubs seen dead must still be known as dead at the next check.
        ready = set(self.server.model_names())
        live = {stub.pid: stub for stub in find_stubs(self.server.process.pid)}
        self._dead_stubs = [stub for pid, stub in self._stubs.items() if pid not in live]
        self._stubs = live
        broken = {stub.model: Fault(f"its backend process {stub.pid} died", restart=True)
                  for stub in self._dead_stubs if stub.model in ready}  # a clean unload also ends the stub
        served = {stub.model for stub in live.values()}
        for model in self.models:
            if model not in ready:
                broken.setdefault(model, Fault("it is no longer loaded (its engine failed)", restart=False))
            elif model not in served:  # its stub died (and was reaped) before this watchdog first saw it
                broken.setdefault(model, Fault("it is loaded but has no backend process", restart=True))
        metrics = self._metrics()
        running = parse_metric(metrics, "flover_requests_running")
        iterations = parse_metric(metrics, "flover_iterations_total")
        for model in self.models:
            if self.stalls.stalled(model, running.get(model, 0.0), iterations.get(model, 0.0), now):
                broken.setdefault(model, Fault(f"no iteration for {self.stalls.stall_s:.0f} s with requests running",
                                               restart=True))
        return broken

    def _count_recovery(self, broken: dict[str, Fault]) -> None:
        """Count one recovery in the window, or raise WatchdogGaveUp when the window is full."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            model, fault = next(iter(broken.items()))
            raise WatchdogGaveUp(f"model {model!r} is broken ({fault.why}) after {len(self.restarts)} recoveries "
                                 f"within {self.restart_window_s:.0f} s")
        self.restarts.append(now)

    def _reload(self, model: str) -> None:
        """Kill what is left of the model's backend and load it afresh."""
        old = [stub for stub in [*self._stubs.values(), *self._dead_stubs] if stub.model == model]
        for stub in old:  # a wedged backend would never finish its own unload
            _kill(stub.pid)
        self._load(model)
        for stub in old:  # a killed stub cannot remove its shared memory itself
            (SHM_DIR / stub.shm_region).unlink(missing_ok=True)

    def _load(self, model: str) -> None:
        url = f"{self.server.http_url}/v2/repository/models/{model}/load"
        request = urllib.request.Request(url, data=b"{}", method="POST", headers=self.server.admin_headers)
        try:
            with urllib.request.urlopen(request, timeout=self.load_timeout_s):
                pass
        except urllib.error.HTTPError as error:
            raise WatchdogGaveUp(f"reloading {model!r} failed: {_error_text(error)}") from None

    def _metrics(self) -> str:
        try:
            with urllib.request.urlopen(self.server.metrics_url, timeout=10) as reply:
                return reply.read().decode()
        except (urllib.error.URLError, TimeoutError):
            return ""  # no reading this round: stall detection waits for the next


class WatchdogGaveUp(RuntimeError):
    """A model could not be kept serving: the launcher should exit non-zero so it is replaced."""


def _alive(pid: int) -> bool:
    try:
        return _state_and_parent(PROC / str(pid))[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", str(error))
    except (ValueError, AttributeError):
        return str(error)
