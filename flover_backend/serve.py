"""Launch tritonserver (the nvidia-pytriton wheel's, or the NGC image's own) and wait until it serves."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from flover_backend.repository import derive_repository

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NGC_TRITON = Path("/opt/tritonserver")
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
STUB = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """tritonserver exited, or never became ready; the message carries the end of its log."""


def work_dir() -> Path:
    """Where the launcher keeps generated files: $FLOVER_HOME/triton, else .cache/flover/triton."""
    if os.environ.get("FLOVER_HOME"):
        return Path(os.environ["FLOVER_HOME"]) / "triton"
    if (PROJECT_ROOT / "pyproject.toml").exists():  # a checkout, where /.cache/ is git-ignored
        return PROJECT_ROOT / ".cache" / "flover" / "triton"
    return Path.home() / ".cache" / "flover" / "triton"


def in_ngc_container() -> bool:
    """True inside NVIDIA's tritonserver image, whose own binary and backends we then use."""
    return (NGC_TRITON / "bin" / "tritonserver").exists()


def pytriton_dist() -> Path:
    """The tritonserver distribution inside the installed nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")  # finds without importing pytriton's heavy __init__
    if spec is None or spec.origin is None:
        raise TritonServerError("nvidia-pytriton is not installed: pip install -e '.[serve]'")
    return Path(spec.origin).parent / "tritonserver"


def pytriton_libs() -> Path:
    """The shared libraries the wheel's tritonserver, stubs and perf_analyzer's deps are linked against."""
    return pytriton_dist().parents[1] / "nvidia_pytriton.libs"


def prepare_backend_dir(dest: Path | None = None) -> Path:
    """Copy the python backend plus the stub built for this Python into `dest` once; return `dest`."""
    if dest is None:
        version = importlib.metadata.version("nvidia-pytriton")
        dest = work_dir() / f"backends-pytriton{version}-py{PY_VERSION}"
    dest = Path(dest)
    if (dest / "python" / STUB).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename into place, so concurrent launchers never see (or run) a half-copied stub.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".backends-"))
    shutil.copytree(pytriton_dist() / "backends" / "python", tmp / "python")
    shutil.copy2(pytriton_dist() / "python_backend_stubs" / PY_VERSION / STUB, tmp / "python" / STUB)
    try:
        tmp.rename(dest)
    except OSError:  # another launcher won the race; its copy is identical
        shutil.rmtree(tmp)
    return dest


def prepare_stub_python(dest: Path | None = None) -> Path:
    """Write a venv-shaped prefix for the backend stub's embedded Python; return its `bin` for PATH.

    The stub starts Python in isolated mode (PyConfig_InitIsolatedConfig: PYTHONPATH is ignored) and
    takes its prefix from the first `python3` on PATH. This prefix's pyvenv.cfg points at the running
    interpreter's base install and its .pth puts the project root and this interpreter's site-packages
    on the stub's sys.path, so model.py can `import flover_backend` and torch without being installed.
    """
    if dest is None:
        dest = work_dir() / f"stub-python{PY_VERSION}-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]}"
    dest = Path(dest)
    site_dir = dest / "lib" / f"python{PY_VERSION}" / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    (dest / "bin").mkdir(exist_ok=True)
    python = dest / "bin" / "python3"
    if not python.is_symlink():
        python.symlink_to(sys.executable)
    _write_if_changed(dest / "pyvenv.cfg", f"home = {Path(sys.base_prefix) / 'bin'}\n"
                      "include-system-site-packages = false\n")
    # addsitedir, not a plain path line, so the real site-packages' own .pth files (editable installs) run.
    site_dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    lines = [str(PROJECT_ROOT)] + [f"import site; site.addsitedir({d!r})" for d in site_dirs]
    _write_if_changed(site_dir / "flover.pth", "\n".join(lines) + "\n")
    return dest / "bin"


def _write_if_changed(path: Path, text: str) -> None:
    """Replace `path` atomically, and only when its text differs (a running server may be reading it)."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def server_env(stub_bin: Path | None = None) -> dict[str, str]:
    """The environment tritonserver runs in: its libraries and the Python its backend stub embeds."""
    env = dict(os.environ)
    libs = []
    # The stub links libpython3.X.so.1.0 by name; load the running interpreter's, whose stdlib the stub
    # will use, rather than a system copy of another patch release (Debian's 3.11.2 vs pyenv's 3.11.7).
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / str(sysconfig.get_config_var("INSTSONAME"))).exists():
        libs.append(libdir)
    if not in_ngc_container():
        libs.append(str(pytriton_libs()))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{stub_bin or prepare_stub_python()}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


def server_command(model_repository: str | Path, http_port: int = 8000, grpc_port: int = 8001,
                   metrics_port: int = 8002, host: str = "127.0.0.1", backend_dir: Path | None = None,
                   extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The tritonserver command line serving `model_repository` on `host` at the three ports."""
    if in_ngc_container():
        binary, backend_dir = NGC_TRITON / "bin" / "tritonserver", backend_dir or NGC_TRITON / "backends"
    else:
        binary, backend_dir = pytriton_dist() / "bin" / "tritonserver", backend_dir or prepare_backend_dir()
    return [
        str(binary),
        f"--model-repository={Path(model_repository).resolve()}",
        f"--backend-directory={backend_dir}",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        *extra_args,
    ]


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
                 stop_timeout_s: float = 40.0):
        self.model_repository = Path(model_repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_path = Path(log_path or work_dir() / "logs" / f"tritonserver-{http_port}.log")
        self.extra_args = (f"--log-verbose={log_verbose}", *extra_args)
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
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
        command = server_command(self.model_repository, self.http_port, self.grpc_port, self.metrics_port,
                                 self.host, extra_args=self.extra_args)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session: a terminal's Ctrl-C reaches only us, and stop() can signal the stubs too.
            self.process = subprocess.Popen(command, env=server_env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
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
        return self.process.wait()

    def model_names(self) -> list[str]:
        """Names of the models the server has loaded and marked READY, from the repository index."""
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
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
