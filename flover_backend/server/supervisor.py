"""The launcher's main loop: wait for a stop or for tritonserver's exit while the watchdog probes on a thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flover_backend.server.stop_signals import StopSignals
from flover_backend.server.watchdog import WatchdogGaveUp

logger = logging.getLogger(__name__)
POLL_S = 1.0  # how often the main loop looks at tritonserver between signals
MAX_BACKOFF_S = 60.0  # the longest pause between probes after failures
CLOSE_WAIT_S = 5.0  # how long a stop waits for a probe under way
DEATH_POLL_S = 1.0  # how often a dead backend is looked for between probes


def probe_delay(interval_s: float, failures: int, max_s: float = MAX_BACKOFF_S) -> float:
    """Seconds until the next probe after `failures` failed probes in a row: doubling, capped at max_s."""
    return min(interval_s * 2 ** min(failures, 32), max(max_s, interval_s))


class ProbeThread:
    """Runs `check()` of the watchdog `make_watchdog()` builds every interval_s, on a thread of its own.

    A probe that raises (a timeout, a refused connection, a reply that is not JSON: tritonserver out of
    file descriptors answers nothing) is counted and tried again later, backing off; it never ends the
    launcher. Only WatchdogGaveUp does, through `gave_up`.
    """

    def __init__(self, make_watchdog: Callable[[], object], interval_s: float):
        self.make_watchdog, self.interval_s = make_watchdog, interval_s
        self.failures = 0  # failed probes in a row
        self.num_failures = 0  # failed probes in all
        self.gave_up: WatchdogGaveUp | None = None
        self.watchdog = None  # built by the first probe that reaches the server; from then on it restarts it
        self._closed = threading.Event()  # set by the main thread, never from a signal handler
        self._thread = threading.Thread(target=self._run, name="flover-watchdog", daemon=True)

    def start(self) -> ProbeThread:
        """Start probing."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop probing. A probe under way gets CLOSE_WAIT_S to end, so it does not take the server's own
        unloading for broken models; one that takes longer (a reload may take minutes) is left to end alone."""
        self._closed.set()
        self._thread.join(CLOSE_WAIT_S)

    def _run(self) -> None:
        delay = self.interval_s
        waited = delay  # so the first probe (which builds the watchdog) runs at once
        tick = 0.0
        while not self._closed.wait(tick):
            waited += tick
            tick = min(DEATH_POLL_S, delay)
            try:
                # Between probes a dead stub or server is looked for every tick (a few /proc reads), so requests
                # in flight end within seconds instead of at the next full probe.
                if self.watchdog is not None and waited < delay and not self.watchdog.urgent(bool(self.failures)):
                    continue
                waited = 0.0
                if self.watchdog is None:  # built here: it asks the server for its models, which may fail too
                    self.watchdog = self.make_watchdog()
                self.watchdog.check()
            except WatchdogGaveUp as error:
                self.gave_up = error
                return
            except Exception as error:  # whatever a probe raises, the server may still serve
                if self._closed.is_set():
                    return  # the server is being stopped under the probe
                self.failures += 1
                self.num_failures += 1
                delay = probe_delay(self.interval_s, self.failures)
                logger.warning("health probe failed (%d in a row): %s: %s; next in %.0f s", self.failures,
                               type(error).__name__, error, delay, exc_info=not isinstance(error, OSError))
            else:
                if self.failures:
                    logger.warning("health probe answered again after %d failures", self.failures)
                self.failures, delay = 0, self.interval_s


def supervise(server, stop: StopSignals, make_watchdog: Callable[[], object] | None = None,
              interval_s: float = 5.0) -> int | None:
    """Until a stop is requested (None) or `server` exits (its code), with the watchdog probing beside.

    Raises WatchdogGaveUp when a model cannot be kept serving (the caller stops the server and exits 1).
    Every wait here is `stop.wait` with a timeout, so a signal ends it within one wake-up whatever the
    probe is doing.
    """
    probes = ProbeThread(make_watchdog, interval_s).start() if make_watchdog is not None else None
    try:
        while True:
            code = server.poll()
            # Once the watchdog runs, it starts an exited tritonserver again (or gives up, below).
            if code is not None and (probes is None or probes.watchdog is None):
                return code
            if probes is not None and probes.gave_up is not None:
                raise probes.gave_up
            if stop.wait(POLL_S):
                return None
    finally:
        if probes is not None:
            probes.close()
