"""The one thread that runs an engine's torch work: loading the model, warming it up and every iteration.

Why one thread: torch's CPU kernels run on OpenMP, and libgomp gives each thread that opens a parallel region
a team of workers of its own. A process whose main thread loaded the model and whose loop thread then decodes
holds two teams, so libgomp manages more threads than there are cores and throttles every worker's spinning:
each of the forward's ~500 parallel regions then waits for a worker to wake from sleep. Measured on the 2-core
EPYC: a oneDNN matmul of 1 x 768 x 2048 takes ~65 us from the thread that made the first team and ~130 us from
a second one, and the 1-row decode step 24 against 33 ms.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class EngineThread:
    """A daemon thread that runs the calls handed to it, one at a time, in order."""

    def __init__(self, name: str = "flover-loop"):
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether `close` was called: the thread takes no more calls."""
        return self._closed

    def submit(self, function: Callable[[], Any]) -> Future:
        """Queue `function()` to run on the thread; its future. Refused once the thread is closed."""
        if self._closed:
            raise RuntimeError(f"{self._thread.name} is closed")
        done: Future = Future()
        self._jobs.put((function, done))
        return done

    @property
    def is_current(self) -> bool:
        """Whether the calling thread is this one."""
        return threading.current_thread() is self._thread

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function()` on the thread (at once where already there) and return its result or raise its error."""
        if self.is_current:
            return function()
        return self.submit(function).result()

    def close(self) -> None:
        """Let the calls already queued run, then end the thread."""
        self._closed = True
        self._jobs.put(None)
        if not self.is_current:
            self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, done = job
            if done.set_running_or_notify_cancel():
                run_into(function, done)


def run_into(function: Callable[[], Any], done: Future) -> None:
    """Run `function()` and settle `done` with its result, or with its error for the caller to raise."""
    try:
        done.set_result(function())
    except BaseException as exc:  # noqa: BLE001 - handed to the caller, who sees it as if raised there
        done.set_exception(exc)
