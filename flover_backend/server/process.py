"""A server as a child process: start it, wait until its URLs answer, stop it, quote its log."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerProcessError(RuntimeError):
    """The server exited, or never became ready; the message carries the end of its log."""


class ServerProcess:
    """A server in its own session, logging to `log_path`: `with Server(...) as server:` starts it and waits.

    Subclasses give the command line, its environment and the URLs that answer 200 once it serves; the
    class attributes below say how it is waited for and stopped.
    """

    name = "server"
    error: type[ServerProcessError] = ServerProcessError
    poll_interval_s = 0.2
    probe_timeout_s = 1.0
    # Stop signals in order, each with the seconds to wait for it, and whether they go to the whole process
    # group (and the group must be gone) or to the server alone, which then stops its children itself.
    stop_signals: tuple[tuple[signal.Signals, float], ...] = (
        (signal.SIGINT, 30.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
    signal_group = False
    error_line = re.compile(r".*error", re.IGNORECASE)  # log lines (from their start) quoted in error messages
    cwd: Path | None = None

    def __init__(self, log_path: str | Path, ready_timeout_s: float):
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The server's environment variables; None: this process's."""
        return None

    def ready_urls(self) -> list[str]:
        """URLs that all answer 200 once the server serves."""
        raise NotImplementedError

    def __enter__(self):  # unannotated: `-> ServerProcess` is wrong for subclasses and Self needs 3.11
        """Start the server and wait until it is ready."""
        return self.start()

    def __exit__(self, *exc_info) -> None:
        """Stop the server, whatever ended the block."""
        self.stop()

    def start(self):  # unannotated, as __enter__
        """Start the server and block until it is ready; raise `self.error` (after stopping it) if it is not."""
        command, env = self.command(), self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session: a terminal's Ctrl-C reaches only us, and stop() can reach its children too.
            self.process = subprocess.Popen(command, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)  # noqa: PLW1509 - see _die_with_parent
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll the ready URLs until all answer 200, the process exits, or the timeout passes."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise self.error(f"{self.name} exited with code {code} before it was ready\n{self.log_excerpt()}")
            if all(self._answers(url) for url in self.ready_urls()):
                return
            time.sleep(self.poll_interval_s)
        raise self.error(f"{self.name} not ready after {self.ready_timeout_s:.0f} s\n{self.log_excerpt()}")

    def _answers(self, url: str) -> bool:
        """Whether `url` answers 200 now."""
        try:
            with urllib.request.urlopen(url, timeout=self.probe_timeout_s) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False  # not listening yet, or listening but not ready (e.g. 400 while models load)

    def poll(self) -> int | None:
        """The exit code if the server has exited, else None."""
        return None if self.process is None else self.process.poll()

    def wait(self) -> int:
        """Block until the server exits; return its exit code."""
        return self.process.wait()

    def stop(self) -> int | None:
        """Send the stop signals in turn until the server is gone; return its exit code."""
        if self.process is None:
            return None
        for sig, timeout_s in self.stop_signals:
            if self._stopped():
                break
            if self.signal_group:
                _signal_group(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
            deadline = time.monotonic() + timeout_s
            while not self._stopped() and time.monotonic() < deadline:
                time.sleep(0.05)
        # A child that outlived its server would hold its memory, ports or devices.
        _signal_group(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the server's whole process group at once (no drain) and wait until it is gone."""
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # its children die with the same signal; wait for their exit
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def _stopped(self) -> bool:
        """Whether the server has exited, and with `signal_group` every other process of its group too."""
        if self.process.poll() is None:
            return False
        if not self.signal_group:
            return True
        try:  # the server is reaped, so its zombie no longer holds the group open
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def log_excerpt(self, num_lines: int = 20) -> str:
        """The log's error lines and its last `num_lines` lines, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        errors = [line for line in lines if self.error_line.match(line)]
        return "\n".join([f"--- errors in {self.log_path} ---", *errors[-num_lines:],
                          f"--- last {num_lines} lines ---", *lines[-num_lines:]])


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it (no locks taken)


def _die_with_parent() -> None:
    """In the forked child: have the kernel SIGKILL the server if its launcher dies, however it dies.

    The kernel sends it when the thread that started the server exits: start servers from a thread that
    lives as long as they should (the main thread, in the launcher and the tests).
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _signal_group(group: int, sig: signal.Signals) -> None:
    """Send `sig` to process group `group`, if anything is left in it."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
