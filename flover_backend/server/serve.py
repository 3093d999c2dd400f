"""Launch tritonserver (the nvidia-pytriton wheel's, or the NGC image's own) and wait until it serves."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from flover_backend.server.openai_launcher import OpenAIFrontError, openai_front
from flover_backend.server.process import (
    LOG_MAX_BYTES,
    ServerProcess,
    ServerProcessError,
    StartInterrupted,
    raise_open_files_limit,
)
from flover_backend.server.repository import derive_repository
from flover_backend.server.stop_signals import StopSignals
from flover_backend.server.supervisor import supervise
from flover_backend.server.watchdog import Watchdog, WatchdogGaveUp
from flover_backend.triton_env import (
    ADMIN_KEY_HEADER,
    GRPC_ADMIN_KEY_HEADER,
    PROJECT_ROOT,
    SHM_DIR,
    server_command,
    server_env,
    work_dir,
)

LOG_LEVELS = ("debug", "info", "warning", "error")  # of the models' Python logging (log_level parameter)
MIN_OPEN_FILES = 128  # tritonserver with one Python model holds ~65 descriptors before any client connects


class TritonServerError(ServerProcessError):
    """tritonserver exited, or never became ready; the message carries the end of its log."""


class TritonServer(ServerProcess):
    """tritonserver as a child process: `with TritonServer(repo) as server:` starts it and waits until ready."""

    name = "tritonserver"
    error = TritonServerError
    error_line = re.compile(r"E\d{4} |error:")

    def __init__(self, model_repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log_path: str | Path | None = None,
                 log_verbose: int = 0, extra_args: tuple[str, ...] = (), ready_timeout_s: float = 300.0,
                 stop_timeout_s: float = 40.0, admin_key: str | None = None, open_files: int | None = None,
                 log_max_bytes: int = LOG_MAX_BYTES):
        super().__init__(log_path or work_dir() / "logs" / f"tritonserver-{http_port}.log", ready_timeout_s,
                         open_files=open_files, log_max_bytes=log_max_bytes)
        self.model_repository = Path(model_repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.extra_args = (f"--log-verbose={log_verbose}", *extra_args)
        # On SIGINT tritonserver drains in-flight requests for up to its --exit-timeout-secs (30 s), so the
        # default stop_timeout_s (40 s) lets that finish before escalating.
        self.stop_signals = ((signal.SIGINT, stop_timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
        # Random per launch when the operator gives none: then only this process can use the admin APIs.
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        # Names this server's shared memory, so stop() (or, if this process is killed, the next launch) removes it.
        self.shm_prefix = f"flover-{os.getpid()}-{secrets.token_hex(4)}-"
        self._lifecycle = threading.Lock()  # held by a restart, so the supervisor's poll skips it
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
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics page."""
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The HTTP header that opens the admin APIs (model load/unload) of this server."""
        return {ADMIN_KEY_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """The gRPC metadata that opens the same APIs over gRPC."""
        return {GRPC_ADMIN_KEY_HEADER: self.admin_key}

    def command(self) -> list[str]:
        """tritonserver's command line."""
        return server_command(self.model_repository, self.http_port, self.grpc_port, self.metrics_port,
                              self.host, extra_args=self.extra_args, admin_key=self.admin_key,
                              shm_prefix=self.shm_prefix)

    def environment(self) -> dict[str, str]:
        """tritonserver's libraries, and the Python its backend stub embeds (prepared here)."""
        return server_env()

    def ready_urls(self) -> list[str]:
        """Readiness, and the metrics page: the metrics service starts listening after HTTP says ready."""
        return [f"{self.http_url}/v2/health/ready", self.metrics_url]

    def start(self) -> TritonServer:
        """Clear what servers killed earlier left behind, then start and wait as every server process does."""
        remove_orphaned_shm()
        return super().start()

    def stop(self) -> int | None:
        """Stop tritonserver and its stubs, then remove the shared memory a killed stub left behind."""
        code = super().stop()
        self._remove_shm()
        return code

    def restart(self) -> TritonServer:
        """Kill tritonserver and its stubs at once, then start it afresh and wait until every model is ready.

        Killing is what ends the requests a dead Python stub left in flight: tritonserver 2.51 never
        finishes them (the stub held their response senders), not even when the model is unloaded, so
        only closing their connections gives their clients an error instead of silence. Runs on the
        watchdog's thread; `poll` says nothing of the killed process meanwhile.
        """
        with self._lifecycle:
            self.kill()
            self._remove_shm()
            if self.log_path.exists():  # keep the log of the run that failed
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".previous"))
            return self.start()

    def poll(self) -> int | None:
        """The exit code once tritonserver has exited on its own; None while it runs or is being restarted."""
        if not self._lifecycle.acquire(blocking=False):
            return None  # the watchdog's thread is restarting it: the old process's exit is no news
        try:
            return super().poll()
        finally:
            self._lifecycle.release()

    def _remove_shm(self) -> None:
        for segment in SHM_DIR.glob(f"{self.shm_prefix}*"):
            segment.unlink(missing_ok=True)

    def model_names(self) -> list[str]:
        """Names of the models the server has loaded and marked READY, from the repository index."""
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers=self.admin_headers)
        with urllib.request.urlopen(request, timeout=5.0) as reply:
            index = json.load(reply)
        return sorted({entry["name"] for entry in index if entry.get("state") == "READY"})


def remove_orphaned_shm() -> None:
    """Remove the shared memory of servers whose launcher has died (its pid is in each region's name)."""
    for segment in SHM_DIR.glob("flover-*-*"):
        pid = segment.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            segment.unlink(missing_ok=True)


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
    parser.add_argument("--open-files", type=_at_least(int, MIN_OPEN_FILES),
                        help="tritonserver's open-file limit; every connection holds one (default: the hard "
                             "limit, `ulimit -Hn`): cap connections in front of it, see the README")
    parser.add_argument("--log-max-mb", type=_at_least(float, 0.01), default=LOG_MAX_BYTES / 2**20,
                        help="size at which tritonserver's log is rotated (one old copy is kept)")
    parser.set_defaults(run=run_serve)


def _at_least(kind: type, low: float):
    """An argparse type: a `kind` number no smaller than `low`."""
    def parse(text: str):
        value = kind(text)
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; return 0 on a requested stop, else tritonserver's exit code."""
    raise_open_files_limit()
    with StopSignals() as stop:  # from here on Ctrl-C and SIGTERM (`kill`, docker stop) only set a flag
        return _serve(args, stop)


def _serve(args: argparse.Namespace, stop: StopSignals) -> int:
    repository = args.model_repository
    settings = model_settings(args)
    if args.models or settings:
        repository = derive_repository(work_dir() / f"repository-{args.http_port}", args.models, settings,
                                       source=args.model_repository)
    server = TritonServer(repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_verbose=args.log_verbose, admin_key=args.admin_key,
                          open_files=args.open_files, log_max_bytes=int(args.log_max_mb * 2**20))
    front_process = openai_front(args.openai_port, args.host, server.grpc_url, server.admin_key)
    for process in (server, front_process):
        if isinstance(process, ServerProcess):
            process.interrupt = stop.wait  # a stop requested while it starts ends the start
    try:
        with server, front_process as front:
            print(f"tritonserver ready (log: {server.log_path})\n"
                  f"  http:    {server.http_url}\n  grpc:    {server.grpc_url}\n  metrics: {server.metrics_url}\n"
                  f"  models:  {_model_list(server)}\n"
                  f"  admin:   {'key from --admin-key' if args.admin_key else 'closed (no --admin-key given)'}\n"
                  "Ctrl-C to stop.", flush=True)
            if front:
                print(f"  openai:  {front.url}/v1 (log: {front.log_path})", flush=True)
            make_watchdog = (lambda: Watchdog(server, stall_s=args.stall_timeout)) if args.watchdog_interval > 0 else None
            code = supervise(server, stop, make_watchdog, args.watchdog_interval)
            if code is None:
                print("stopped.", file=sys.stderr)
                return 0
            print(f"tritonserver exited on its own with code {code}\n{server.log_excerpt()}", file=sys.stderr)
            return max(code, 1)
    except StartInterrupted:
        print("stopped.", file=sys.stderr)
        return 0
    except (TritonServerError, WatchdogGaveUp, OpenAIFrontError) as error:
        print(error, file=sys.stderr)
        return 1


def _model_list(server: TritonServer) -> str:
    """The banner's model names; the probe can fail (a flood of connections) without stopping the launch."""
    try:
        return ", ".join(server.model_names()) or "(none)"
    except (OSError, ValueError, http.client.HTTPException) as error:  # the watchdog keeps probing
        return f"(unknown: {type(error).__name__}: {error})"


def model_settings(args: argparse.Namespace) -> dict[str, str]:
    """The parameters to set in every served model's config.pbtxt: `--set`'s, and `--log-level` as log_level."""
    settings = dict(item.split("=", 1) for item in args.set)
    if args.log_level:
        settings["log_level"] = args.log_level
    return settings
