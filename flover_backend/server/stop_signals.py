"""Ctrl-C and SIGTERM as a flag plus a wake-up byte: the launcher's only signal handling."""

from __future__ import annotations

import select
import signal
import socket


class StopSignals:
    """`with StopSignals() as stop:` turns SIGINT and SIGTERM into `stop.requested`, and wakes `stop.wait`.

    The Python handler only stores the signal number: it runs in the main thread between two bytecodes of
    whatever that thread was doing, so a handler that took a lock (`Event.set`) could wait forever for a
    lock the interrupted frame holds. The wake-up comes from the C handler, which writes the signal number
    to a socket (`signal.set_wakeup_fd`); `wait` selects on it, so a signal that lands just before the select
    still ends it at once.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.signum: int | None = None
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._old_fd = -1
        self._old_handlers: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether one of the signals has arrived."""
        return self.signum is not None

    def __enter__(self):  # unannotated, as ServerProcess.__enter__
        """Install the handlers (from the main thread, as Python requires)."""
        self._reader, self._writer = socket.socketpair()
        for end in (self._reader, self._writer):
            end.setblocking(False)  # set_wakeup_fd requires it; a full buffer then drops a byte, never blocks
        self._old_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._old_handlers = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc_info) -> None:
        """Restore the previous handlers and wake-up fd."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_fd)
        self._reader.close()
        self._writer.close()

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum  # nothing else: see the class docstring

    def wait(self, timeout_s: float) -> bool:
        """Block until a signal arrives or `timeout_s` passes; whether a stop was requested."""
        if not self.requested:
            select.select([self._reader], [], [], max(timeout_s, 0.0))
            try:
                while self._reader.recv(4096):
                    pass
            except BlockingIOError:
                pass
        return self.requested
