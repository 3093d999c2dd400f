"""Launch tritonserver (the nvidia-pytriton wheel's, or the NGC image's own) and wait until it serves."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from flover_backend.openai_front.launcher import OpenAIFrontError, openai_front
from flover_backend.repository import derive_repository
from flover_backend.triton_env import (
    ADMIN_KEY_HEADER,
    GRPC_ADMIN_KEY_HEADER,
    PROJECT_ROOT,
    SHM_DIR,
    server_command,
    server_env,
    work_dir,
)
from flover_backend.watchdog import Watchdog, WatchdogGaveUp

LOG_LEVELS = ("debug", "info", "warning", "error")  # of the models' Python logging (log_level parameter)


class TritonServerError(RuntimeError):
    """tritonserver exited, or never became ready; the message carries the end of its log."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (tests; another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TritonServer:
    """tritonserver as a child process: `with TritonServer(repo) as server:` starts it and waits until ready."""

    def __init__(self, model_repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log_path: str | Path | None = None,
                 log_verbose: int = 0, extra_args: tuple[str, ...] = (), ready_timeout_s: float = 300.0,
                 stop_timeout_s: float = 40.0, admin_key: str | None = None):
        self.model_repository = Path(model_repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_path = Path(log_path or work_dir() / "logs" / f"tritonserver-{http_port}.log")
        self.extra_args = (f"--log-verbose={log_verbose}", *extra_args)
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        # Random per launch when the operator gives none: then only this process can use the admin APIs.
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        # Names this server's shared memory, so stop() (or, if this process is killed, the next launch) removes it.
        self.shm_prefix = f"flover-{os.getpid()}-{secrets.token_hex(4)}-"
        self.process: subprocess.Popen | None = None
        # Clients cannot connect to a wildcard address; they reach a server bound to one over loopback.
        self._client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP/REST endpoint, e.g. http://127.0.0.1:8000."""
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint, as tritonclient.grpc and perf_analyzer take it."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The HTTP header that opens the admin APIs (model load/unload) of this server."""
        return {ADMIN_KEY_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """The gRPC metadata that opens the same APIs over gRPC."""
        return {GRPC_ADMIN_KEY_HEADER: self.admin_key}

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics page."""
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    def __enter__(self):  # unannotated: `-> TritonServer` is wrong for subclasses and Self needs 3.11
        """Start the server and wait until it is ready."""
        return self.start()

    def __exit__(self, *exc_info) -> None:
        """Stop the server, whatever ended the block."""
        self.stop()

    def start(self) -> TritonServer:
        """Start tritonserver and block until /v2/health/ready answers 200; raise TritonServerError if not."""
        remove_orphaned_shm()
        command = server_command(self.model_repository, self.http_port, self.grpc_port, self.metrics_port,
                                 self.host, extra_args=self.extra_args, admin_key=self.admin_key,
                                 shm_prefix=self.shm_prefix)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session: a terminal's Ctrl-C reaches only us, and stop() can signal the stubs too.
            self.process = subprocess.Popen(command, env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)  # noqa: PLW1509 - see _die_with_parent
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll the readiness endpoint until it says yes, the process exits, or the timeout passes."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready\n"
                                        f"{self.log_excerpt()}")
            # The metrics service starts listening after HTTP says ready: wait for both.
            if _answers(f"{self.http_url}/v2/health/ready") and _answers(self.metrics_url):
                return
            time.sleep(0.2)
        raise TritonServerError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s\n{self.log_excerpt()}")

    def poll(self) -> int | None:
        """The exit code if tritonserver has exited, else None."""
        return None if self.process is None else self.process.poll()

    def wait(self) -> int:
        """Block until tritonserver exits; return its exit code."""
        return self.process.wait()

    def stop(self) -> int | None:
        """Stop tritonserver: SIGINT, then SIGTERM, then SIGKILL; return its exit code.

        On SIGINT tritonserver drains in-flight requests for up to its --exit-timeout-secs (30 s), so the
        default stop_timeout_s (40 s) lets that finish before escalating.
        """
        if self.process is None:
            return None
        for sig, timeout_s in ((signal.SIGINT, self.stop_timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # a stub that outlived a killed server would hold its shared memory and the model's device
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self.process.wait()
        for segment in SHM_DIR.glob(f"{self.shm_prefix}*"):  # left behind by a stub that was killed
            segment.unlink(missing_ok=True)
        return code

    def model_names(self) -> list[str]:
        """Names of the models the server has loaded and marked READY, from the repository index."""
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers=self.admin_headers)
        with urllib.request.urlopen(request, timeout=5.0) as reply:
            index = json.load(reply)
        return sorted({entry["name"] for entry in index if entry.get("state") == "READY"})

    def log_excerpt(self, num_lines: int = 20) -> str:
        """The log's error lines and its last `num_lines` lines, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        errors = [line for line in lines if re.match(r"E\d{4} |error:", line)]
        return "\n".join([f"--- errors in {self.log_path} ---", *errors[-num_lines:],
                          f"--- last {num_lines} lines ---", *lines[-num_lines:]])


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it (no locks taken)


def remove_orphaned_shm() -> None:
    """Remove the shared memory of servers whose launcher has died (its pid is in each region's name)."""
    for segment in SHM_DIR.glob("flover-*-*"):
        pid = segment.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            segment.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the forked child: have the kernel SIGKILL tritonserver if the launcher dies, however it dies.

    The kernel sends it when the thread that started the server exits: start servers from a thread that
    lives as long as they should (the main thread, in the launcher and the tests).
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False  # not listening yet, or listening but models still loading (400)


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve`: run tritonserver on a model repository until Ctrl-C or SIGTERM."""
    parser = subparsers.add_parser("serve", help="run tritonserver with the flover model repository")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--openai-port", type=int, help="also serve the OpenAI-compatible API (/v1/...) on this "
                                                        "port of --host (default: off)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="level of the models' own Python log, in tritonserver's (default: each model's "
                             "log_level parameter, else info: one line per finished request)")
    parser.add_argument("--models", nargs="+", help="serve only these models of the repository (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an engine parameter of every served model, e.g. --set model=builtin:tiny")
    parser.add_argument("--admin-key", default=os.environ.get("FLOVER_ADMIN_KEY"),
                        help="key that opens the model load/unload and other admin APIs (header flover-admin-key); "
                             "default $FLOVER_ADMIN_KEY, else a random key nobody else learns: the APIs stay shut")
    parser.add_argument("--watchdog-interval", type=float, default=5.0,
                        help="seconds between checks that every model's backend is alive and making progress "
                             "(0 turns the watchdog off)")
    parser.add_argument("--stall-timeout", type=float, default=120.0,
                        help="a model with requests running but no iteration for this long is reloaded")
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; return 0 on a requested stop, else tritonserver's exit code."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # stop cleanly under `kill` and docker stop
    repository = args.model_repository
    settings = model_settings(args)
    if args.models or settings:
        repository = derive_repository(work_dir() / f"repository-{args.http_port}", args.models, settings,
                                       source=args.model_repository)
    server = TritonServer(repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_verbose=args.log_verbose, admin_key=args.admin_key)
    try:
        with server, openai_front(args.openai_port, args.host, server.grpc_url, server.admin_key) as front:
            print(f"tritonserver ready (log: {server.log_path})\n"
                  f"  http:    {server.http_url}\n  grpc:    {server.grpc_url}\n  metrics: {server.metrics_url}\n"
                  f"  models:  {', '.join(server.model_names()) or '(none)'}\n"
                  f"  admin:   {'key from --admin-key' if args.admin_key else 'closed (no --admin-key given)'}\n"
                  "Ctrl-C to stop.", flush=True)
            if front:
                print(f"  openai:  {front.url}/v1 (log: {front.log_path})", flush=True)
            code = supervise(server, args.watchdog_interval, args.stall_timeout, _stop_on_signals())
            if code is None:
                print("stopped.", file=sys.stderr)
                return 0
            print(f"tritonserver exited on its own with code {code}\n{server.log_excerpt()}", file=sys.stderr)
            return max(code, 1)
    except KeyboardInterrupt:  # while starting
        print("stopped.", file=sys.stderr)
        return 0
    except (TritonServerError, WatchdogGaveUp, OpenAIFrontError) as error:
        print(error, file=sys.stderr)
        return 1


def model_settings(args: argparse.Namespace) -> dict[str, str]:
    """The parameters to set in every served model's config.pbtxt: `--set`'s, and `--log-level` as log_level."""
    settings = dict(item.split("=", 1) for item in args.set)
    if args.log_level:
        settings["log_level"] = args.log_level
    return settings


def supervise(server: TritonServer, interval_s: float, stall_s: float, stop: threading.Event) -> int | None:
    """Until `stop` is set (None) or tritonserver exits (its code), reloading broken models every interval_s.

    Raises WatchdogGaveUp when a model cannot be kept serving (the caller stops the server and exits 1).
    """
    watchdog = Watchdog(server, stall_s=stall_s) if interval_s > 0 else None
    next_check = time.monotonic() + interval_s
    while not stop.wait(timeout=1.0):
        code = server.poll()
        if code is not None:
            return code
        if watchdog is not None and time.monotonic() >= next_check:
            watchdog.check()
            next_check = time.monotonic() + interval_s
    return None


def _stop_on_signals() -> threading.Event:
    """An event that Ctrl-C and SIGTERM set, instead of raising KeyboardInterrupt wherever the main thread is.

    An exception raised at an arbitrary point can land inside Popen's wait bookkeeping and leave its lock
    held, after which the child's exit is never seen: the stop then waits out every timeout.
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into the same orderly shutdown as Ctrl-C."""
    raise KeyboardInterrupt
