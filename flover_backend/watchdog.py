"""Supervision of a running tritonserver: a model whose backend died or wedged is reloaded, or the launcher gives up.

tritonserver 2.51 keeps a model READY when its Python backend process is killed (by the kernel's OOM
killer, say): every request then fails with "Stub process is not healthy" while every health endpoint
answers 200. The watchdog looks at what the server does not: the stub processes themselves (Linux
/proc), whether a model that has requests running still makes iterations (its own metrics), and
whether a model it was started with is still loaded (an engine that died unloads its model). It
reloads such a model through the admin API; past `max_restarts` within `restart_window_s` it gives up,
so the launcher exits non-zero and the orchestrator replaces the whole server.
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


def find_stubs(server_pid: int) -> list[Stub]:
    """The live (not zombie) Python-backend stub processes tritonserver `server_pid` has started."""
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
        if ppid != server_pid or state == "Z" or len(argv) < 3 or not argv[0].endswith(STUB.encode()):
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


class Watchdog:
    """Checks a `TritonServer`'s models every call to `check`, reloading the broken ones."""

    def __init__(self, server, stall_s: float = 120.0, max_restarts: int = 3, restart_window_s: float = 600.0,
                 load_timeout_s: float = 600.0):
        self.server = server
        self.models = server.model_names()  # what the server was started with: what must stay served
        self.max_restarts, self.restart_window_s, self.load_timeout_s = max_restarts, restart_window_s, load_timeout_s
        self.stalls = StallDetector(stall_s)
        self.restarts: deque[float] = deque()
        self._stubs = {stub.pid: stub for stub in find_stubs(server.process.pid)}
        self._dead_stubs: list[Stub] = []

    def check(self) -> list[str]:
        """Find the broken models and reload them; the ones reloaded. Raises WatchdogGaveUp past the limit."""
        broken = self._broken_models()
        for model, why in broken.items():
            self._recover(model, why)
        return sorted(broken)

    def _broken_models(self) -> dict[str, str]:
        """Each unhealthy model and why."""
        now = time.monotonic()
        # The server first: when it does not answer (the caller counts a failed probe and tries again), the
        # stubs seen dead must still be known as dead at the next check.
        ready = set(self.server.model_names())
        live = {stub.pid: stub for stub in find_stubs(self.server.process.pid)}
        self._dead_stubs = [stub for pid, stub in self._stubs.items() if pid not in live]
        broken = {stub.model: f"its backend process {stub.pid} died" for stub in self._dead_stubs}
        self._stubs = live
        for model in self.models:
            if model not in ready:
                broken.setdefault(model, "it is no longer loaded (its engine failed)")
        metrics = self._metrics()
        running = parse_metric(metrics, "flover_requests_running")
        iterations = parse_metric(metrics, "flover_iterations_total")
        for model in self.models:
            if self.stalls.stalled(model, running.get(model, 0.0), iterations.get(model, 0.0), now):
                broken.setdefault(model, f"no iteration for {self.stalls.stall_s:.0f} s with requests running")
        return broken

    def _recover(self, model: str, why: str) -> None:
        """Kill what is left of the model's backend and load it afresh."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            raise WatchdogGaveUp(f"model {model!r} is broken ({why}) after {len(self.restarts)} reloads within "
                                 f"{self.restart_window_s:.0f} s")
        self.restarts.append(now)
        logger.error("model %r is broken: %s; reloading it", model, why)
        old = [stub for stub in [*self._stubs.values(), *self._dead_stubs] if stub.model == model]
        for stub in old:  # a wedged backend would never finish its own unload
            _kill(stub.pid)
        self._load(model)
        for stub in old:  # a killed stub cannot remove its shared memory itself
            (SHM_DIR / stub.shm_region).unlink(missing_ok=True)
        self._stubs = {stub.pid: stub for stub in find_stubs(self.server.process.pid)}
        self.stalls.forget(model)
        logger.warning("model %r reloaded", model)

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
