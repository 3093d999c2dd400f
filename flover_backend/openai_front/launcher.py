"""Run the OpenAI front as a child process beside tritonserver, and stop it again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flover_backend.triton_env import work_dir


class OpenAIFrontError(RuntimeError):
    """The front exited, or never answered its health check; the message carries the end of its log."""


class OpenAIFront:
    """`with OpenAIFront(grpc_url, port=8003) as front:` starts the front and waits until it serves."""

    def __init__(self, triton_grpc_url: str, *, host: str = "127.0.0.1", port: int = 8003,
                 model_path: str | None = None, admin_key: str | None = None, log_path: str | Path | None = None,
                 extra_args: tuple[str, ...] = (), ready_timeout_s: float = 120.0, stop_timeout_s: float = 10.0):
        self.triton_grpc_url, self.host, self.port, self.model_path = triton_grpc_url, host, port, model_path
        self.admin_key = admin_key
        self.log_path = Path(log_path or work_dir() / "logs" / f"openai-front-{port}.log")
        self.extra_args, self.ready_timeout_s, self.stop_timeout_s = extra_args, ready_timeout_s, stop_timeout_s
        self.process: subprocess.Popen | None = None
        self._client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8003 (OpenAI clients take it with `/v1` appended)."""
        return f"http://{self._client_host}:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "flover_backend.openai_front", "--triton-grpc-url", self.triton_grpc_url,
                   "--host", self.host, "--port", str(self.port), *self.extra_args]
        return command + (["--model-path", self.model_path] if self.model_path else [])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> OpenAIFront:
        """Start the front and block until /health answers 200; raise OpenAIFrontError if it does not."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session, as tritonserver's: a terminal's Ctrl-C reaches the launcher only, which stops us.
            # The key goes by environment, not argv: any local user can read a process's command line.
            env = {**os.environ, "FLOVER_ADMIN_KEY": self.admin_key or ""}
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise OpenAIFrontError(f"the OpenAI front exited with code {code}\n{self.log_excerpt()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                    urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as reply:
                if reply.status == 200:
                    return
            time.sleep(0.2)
        raise OpenAIFrontError(f"the OpenAI front not ready after {self.ready_timeout_s:.0f} s\n{self.log_excerpt()}")

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> int | None:
        """SIGINT (uvicorn's graceful stop: open streams get a few seconds), then SIGKILL."""
        if self.process is None:
            return None
        for sig in (signal.SIGINT, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(self.stop_timeout_s)
        return self.process.wait()

    def log_excerpt(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return "\n".join([f"--- last {num_lines} lines of {self.log_path} ---", *lines[-num_lines:]])


def start_openai_front(triton_grpc_url: str, *, host: str = "127.0.0.1", port: int = 8003,
                       **options) -> OpenAIFront:
    """Start the front for the tritonserver at `triton_grpc_url`; returns the handle whose `stop()` ends it."""
    return OpenAIFront(triton_grpc_url, host=host, port=port, **options).start()


def openai_front(port: int | None, host: str, triton_grpc_url: str, admin_key: str):
    """For `flover serve --openai-port`: a context that runs the front on `port`, or does nothing if None."""
    if port is None:
        return contextlib.nullcontext()
    return OpenAIFront(triton_grpc_url, host=host, port=port, admin_key=admin_key)
