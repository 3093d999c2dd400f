"""A server as a child process: start it, wait until its URLs answer, stop it, quote its log."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flover_backend.server.capped_log import CappedLog

LOG_MAX_BYTES = 64 << 20  # per log file; with the one rotated copy at most 128 MiB per server on disk
EXCERPT_BYTES = 4 << 20  # the end of the log that error messages quote from


class ServerProcessError(RuntimeError):
    """The server exited, or never became ready; the message carries the end of its log."""


class StartInterrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) while the server was starting; it has been stopped again."""


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

    def __init__(self, log_path: str | Path, ready_timeout_s: float, *, open_files: int | None = None,
                 log_max_bytes: int = LOG_MAX_BYTES):
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        # Every connection holds a descriptor: by default the server may open as many as the hard limit allows.
        self.open_files = open_files or open_files_hard_limit()
        self.log_max_bytes = log_max_bytes
        self.process: subprocess.Popen | None = None
        self.log: CappedLog | None = None
        # Waits between readiness polls; returns True when the start should be abandoned (the launcher's
        # StopSignals.wait). Never a sleep a signal handler has to break out of with an exception.
        self.interrupt: Callable[[float], bool] = _sleep

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
        read_end, write_end = os.pipe()
        try:
            # Own session: a terminal's Ctrl-C reaches only us, and stop() can reach its children too.
            self.process = subprocess.Popen(command, env=env, cwd=self.cwd, stdout=write_end, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_child_setup(self.open_files))  # noqa: PLW1509 - see there
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child holds it now: the copy ends when the child and its children exit
        self.log = CappedLog(read_end, self.log_path, self.log_max_bytes).start()
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
            if self.interrupt(self.poll_interval_s):
                raise StartInterrupted(f"stop requested while {self.name} was starting")
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
        code = self.process.wait()
        self.log.join(timeout_s=5.0)  # the log's last lines; a grandchild in another group may hold the pipe
        return code

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
        tail = _tail([self.log_path.with_name(self.log_path.name + ".1"), self.log_path], EXCERPT_BYTES)
        if tail is None:
            return f"(no log at {self.log_path})"
        lines = tail.decode(errors="replace").splitlines()
        errors = [line for line in lines if self.error_line.match(line)]
        return "\n".join([f"--- errors in {self.log_path} ---", *errors[-num_lines:],
                          f"--- last {num_lines} lines ---", *lines[-num_lines:]])


def _tail(paths: list[Path], max_bytes: int) -> bytes | None:
    """The last `max_bytes` of the files `paths` joined in order (missing ones skipped); None if none exists."""
    tail, found = b"", False
    for path in reversed(paths):
        try:
            with open(path, "rb") as file:
                found = True
                size = file.seek(0, os.SEEK_END)
                file.seek(max(0, size - (max_bytes - len(tail))))
                tail = file.read() + tail
        except FileNotFoundError:
            continue
        if len(tail) >= max_bytes:
            break
    return tail if found else None


def open_files_hard_limit() -> int:
    """The most file descriptors a process may raise its own limit to (RLIMIT_NOFILE's hard limit)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:  # the kernel still caps it at fs.nr_open
        hard = int(Path("/proc/sys/fs/nr_open").read_text())
    return hard


def raise_open_files_limit() -> int:
    """Raise this process's descriptor limit to the hard limit; the new limit."""
    limit = open_files_hard_limit()
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return limit


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it (no locks taken)


def _child_setup(open_files: int) -> Callable[[], None]:
    """What the forked child runs before exec: its descriptor limit, and death with its launcher.

    The kernel sends PDEATHSIG when the thread that started the server exits: start servers from a thread
    that lives as long as they should (the main thread, in the launcher and the tests).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = (min(open_files, hard) if hard != resource.RLIM_INFINITY else open_files, hard)

    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return setup


def _signal_group(group: int, sig: signal.Signals) -> None:
    """Send `sig` to process group `group`, if anything is left in it."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
