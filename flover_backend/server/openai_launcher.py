"""Run the OpenAI front as a child process beside tritonserver, and stop it again."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from flover_backend.server.process import ServerProcess, ServerProcessError
from flover_backend.triton_env import work_dir


class OpenAIFrontError(ServerProcessError):
    """The front exited, or never answered its health check; the message carries the end of its log."""


class OpenAIFront(ServerProcess):
    """`with OpenAIFront(grpc_url, port=8003) as front:` starts the front and waits until it serves."""

    name = "the OpenAI front"
    error = OpenAIFrontError
    stop_signals = ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0))  # SIGINT: uvicorn's graceful stop

    def __init__(self, triton_grpc_url: str, *, host: str = "127.0.0.1", port: int = 8003,
                 model_path: str | None = None, admin_key: str | None = None, log_path: str | Path | None = None,
                 extra_args: tuple[str, ...] = (), ready_timeout_s: float = 120.0):
        super().__init__(log_path or work_dir() / "logs" / f"openai-front-{port}.log", ready_timeout_s)
        self.triton_grpc_url, self.host, self.port, self.model_path = triton_grpc_url, host, port, model_path
        self.admin_key, self.extra_args = admin_key, extra_args
        self._client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8003 (OpenAI clients take it with `/v1` appended)."""
        return f"http://{self._client_host}:{self.port}"

    def command(self) -> list[str]:
        """The front's command line."""
        command = [sys.executable, "-m", "flover_backend.frontends.openai", "--triton-grpc-url", self.triton_grpc_url,
                   "--host", self.host, "--port", str(self.port), *self.extra_args]
        return command + (["--model-path", self.model_path] if self.model_path else [])

    def environment(self) -> dict[str, str]:
        """This process's environment plus the admin key: by environment, since any local user can read argv."""
        return {**os.environ, "FLOVER_ADMIN_KEY": self.admin_key or ""}

    def ready_urls(self) -> list[str]:
        """The front's own health check."""
        return [f"{self.url}/health"]


def openai_front(port: int | None, host: str, triton_grpc_url: str, admin_key: str):
    """For `flover serve --openai-port`: a context that runs the front on `port`, or does nothing if None."""
    if port is None:
        return contextlib.nullcontext()
    return OpenAIFront(triton_grpc_url, host=host, port=port, admin_key=admin_key)
