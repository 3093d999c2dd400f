"""ServerProcess, the launcher under tritonserver's and vLLM's: ready once its URLs answer, stopped as a group."""

import os
import resource
import signal
import sys

import pytest

from flover_backend.ports import find_free_port
from flover_backend.server import process as server_process
from flover_backend.server.process import ServerProcess, ServerProcessError


class Server(ServerProcess):
    """A Python one-liner as a server; with an http.server it answers on `port`."""

    name = "test server"
    signal_group = True  # as vLLM's launcher: the whole group must be gone
    stop_signals = ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0))

    def __init__(self, tmp_path, code: str, ready_timeout_s: float = 30.0):
        super().__init__(tmp_path / "server.log", ready_timeout_s)
        self.code, self.port = code, find_free_port()

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code.format(port=self.port)]

    def ready_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port}/"]


# Serves HTTP after a moment, with a child process in its group that must be stopped with it.
HTTP_SERVER = """
import subprocess, sys, time, http.server
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
time.sleep(0.5)
http.server.HTTPServer(("127.0.0.1", {port}), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ready_when_its_url_answers_and_stopped_with_its_children(tmp_path):
    with Server(tmp_path, HTTP_SERVER) as server:
        assert server.poll() is None
        pgid = server.process.pid
        assert group_alive(pgid)
    assert server.poll() is not None
    assert not group_alive(pgid)


def test_exit_before_ready_raises_with_the_log(tmp_path):
    server = Server(tmp_path, "import sys; print('error: no such flag', flush=True); sys.exit(3)")
    with pytest.raises(ServerProcessError, match="test server exited with code 3") as failure:
        server.start()
    assert "error: no such flag" in str(failure.value)


def test_never_ready_is_stopped_after_the_timeout(tmp_path):
    server = Server(tmp_path, "import time; time.sleep(60)", ready_timeout_s=1.0)
    with pytest.raises(ServerProcessError, match="test server not ready after 1 s"):
        server.start()
    assert server.poll() is not None and not group_alive(server.process.pid)


def test_log_excerpt_quotes_the_rotated_log_then_the_current_one_and_only_their_end(tmp_path, monkeypatch):
    server = Server(tmp_path, "")
    (tmp_path / "server.log.1").write_text("error: before the rotation\n" + "filler\n" * 1000)
    (tmp_path / "server.log").write_text("error: after it\nlast line\n")
    excerpt = server.log_excerpt()
    assert excerpt.index("error: before the rotation") < excerpt.index("error: after it")
    assert excerpt.endswith("last line")
    monkeypatch.setattr(server_process, "EXCERPT_BYTES", 100)  # a flood's log is not read whole
    assert "before the rotation" not in server.log_excerpt() and "after it" in server.log_excerpt()


def test_the_launcher_raises_its_own_open_file_limit_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert server_process.raise_open_files_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == server_process.open_files_hard_limit()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
