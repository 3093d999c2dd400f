"""Launch tritonserver (the nvidia-pytriton wheel's, or the NGC image's own) and wait until it serves."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import urllib.request
from pathlib import Path

from flover_backend.repository import derive_repository
from flover_backend.server_process import ServerProcess, ServerProcessError
from flover_backend.triton_env import PROJECT_ROOT, server_command, server_env, work_dir


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
                 stop_timeout_s: float = 40.0):
        super().__init__(log_path or work_dir() / "logs" / f"tritonserver-{http_port}.log", ready_timeout_s)
        self.model_repository = Path(model_repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.extra_args = (f"--log-verbose={log_verbose}", *extra_args)
        # On SIGINT tritonserver drains in-flight requests for up to its --exit-timeout-secs (30 s), so the
        # default stop_timeout_s (40 s) lets that finish before escalating.
        self.stop_signals = ((signal.SIGINT, stop_timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
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

    def command(self) -> list[str]:
        """tritonserver's command line."""
        return server_command(self.model_repository, self.http_port, self.grpc_port, self.metrics_port,
                              self.host, extra_args=self.extra_args)

    def environment(self) -> dict[str, str]:
        """tritonserver's libraries, and the Python its backend stub embeds (prepared here)."""
        return server_env()

    def ready_urls(self) -> list[str]:
        """Readiness, and the metrics page: the metrics service starts listening after HTTP says ready."""
        return [f"{self.http_url}/v2/health/ready", self.metrics_url]

    def model_names(self) -> list[str]:
        """Names of the models the server has loaded and marked READY, from the repository index."""
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5.0) as reply:
            index = json.load(reply)
        return sorted({entry["name"] for entry in index if entry.get("state") == "READY"})


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve`: run tritonserver on a model repository until Ctrl-C or SIGTERM."""
    parser = subparsers.add_parser("serve", help="run tritonserver with the flover model repository")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level")
    parser.add_argument("--models", nargs="+", help="serve only these models of the repository (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an engine parameter of every served model, e.g. --set model=builtin:tiny")
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; return 0 on a requested stop, else tritonserver's exit code."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # stop cleanly under `kill` and docker stop
    repository = args.model_repository
    if args.models or args.set:
        settings = dict(item.split("=", 1) for item in args.set)
        repository = derive_repository(work_dir() / f"repository-{args.http_port}", args.models, settings,
                                       source=args.model_repository)
    server = TritonServer(repository, host=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=args.log_verbose)
    try:
        with server:
            print(f"tritonserver ready (log: {server.log_path})\n"
                  f"  http:    {server.http_url}\n  grpc:    {server.grpc_url}\n  metrics: {server.metrics_url}\n"
                  f"  models:  {', '.join(server.model_names()) or '(none)'}\nCtrl-C to stop.", flush=True)
            code = server.wait()
            print(f"tritonserver exited on its own with code {code}\n{server.log_excerpt()}", file=sys.stderr)
            return max(code, 1)
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
        return 0
    except TritonServerError as error:
        print(error, file=sys.stderr)
        return 1


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into the same orderly shutdown as Ctrl-C."""
    raise KeyboardInterrupt
