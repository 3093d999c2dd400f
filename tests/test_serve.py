"""The launcher against a real tritonserver: readiness, HTTP and gRPC streaming, shutdown, failures."""

from __future__ import annotations

import json
import queue
import re
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clients.perf_analyzer import parse_throughput, perf_analyzer_command, perf_analyzer_env, write_input_data
from flover_backend.cli import build_parser
from flover_backend.ports import server_ports
from flover_backend.server.serve import TritonServer, TritonServerError, model_settings
from flover_backend.triton_env import PROJECT_ROOT, prepare_backend_dir, server_command
from tests.echo_server import group_members, launch_cli, write_repository
from tests.waiting import wait_for

pytestmark = pytest.mark.triton

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with the torch-importing echo model, shared by the streaming tests."""
    tmp = tmp_path_factory.mktemp("triton")
    repo = write_repository(tmp / "repo", extra_import="import torch")
    with TritonServer(repo, log_path=tmp / "server.log", ready_timeout_s=120, **server_ports()) as running:
        yield running


def test_server_command_names_ports_and_backends(tmp_path):
    backend_dir = prepare_backend_dir(tmp_path / "backends")
    assert prepare_backend_dir(tmp_path / "backends") == backend_dir  # second call reuses the first copy
    assert (backend_dir / "python" / "triton_python_backend_stub").exists()
    command = server_command(tmp_path, 1, 2, 3, "0.0.0.0", backend_dir, ["--log-verbose=1"], admin_key="k3y")
    assert f"--backend-directory={backend_dir}" in command
    assert {"--http-port=1", "--grpc-port=2", "--metrics-port=3", "--grpc-address=0.0.0.0"} <= set(command)
    restricted = "model-repository,shared-memory,trace,logging:flover-admin-key=k3y"
    assert {f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"} <= set(command)
    assert command[-1] == "--log-verbose=1"
    for bad_key in ("", "a,b", "a:b", "a=b", "a b"):
        with pytest.raises(ValueError, match="admin key"):
            server_command(tmp_path, admin_key=bad_key)


def test_ready_and_model_index(server):
    with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5) as reply:
        assert reply.status == 200
    assert server.model_names() == ["echo"]
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        assert b"nv_inference_request_success" in reply.read()


def test_http_generate_stream(server):
    request = urllib.request.Request(f"{server.http_url}/v2/models/echo/generate_stream",
                                     data=json.dumps({"text_input": "hi"}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        events = [json.loads(line[len(b"data:"):]) for line in reply if line.startswith(b"data:")]
    assert [event["text_output"] for event in events] == ["hi 0", "hi 1", "hi 2"]
    # the stub imported the checkout's package, not some other installed copy
    assert Path(events[0]["module_path"]).resolve() == PROJECT_ROOT / "flover_backend" / "__init__.py"


def test_grpc_stream(server):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"yo"], dtype=np.object_))
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("echo", [text], request_id="r1", enable_empty_final_response=True)
        outputs = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None
            if result.get_response().parameters["triton_final_response"].bool_param:
                assert result.as_numpy("text_output") is None  # the empty final response
                break
            outputs.append(result.as_numpy("text_output")[0])
    finally:
        client.stop_stream()
        client.close()
    assert outputs == [b"yo 0", b"yo 1", b"yo 2"]


def test_perf_analyzer_runs(server, tmp_path):
    input_data = write_input_data(tmp_path / "input.json", [{"text_input": ["hello"]}])
    command = perf_analyzer_command("echo", server.grpc_url, 2, input_data, 1000, request_count=100)
    done = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Detected decoupled model" in done.stdout
    (throughput,) = parse_throughput(done.stdout)
    assert throughput > 0


def test_stop_ends_server_and_stubs(tmp_path):
    repo = write_repository(tmp_path / "repo")
    server = TritonServer(repo, log_path=tmp_path / "server.log", **server_ports()).start()
    pgid = server.process.pid
    try:
        assert len(group_members(pgid)) >= 2  # tritonserver and the model's stub
        started = time.monotonic()
        assert server.stop() == 0  # a clean exit on SIGINT, not a kill
        assert time.monotonic() - started < 15
        assert group_members(pgid) == []
    finally:
        server.stop()  # again, if an assertion failed before it: SIGKILLs the group at the end


def open_files_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of process `pid`, from /proc."""
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    return int(line.split()[3]), int(line.split()[4])


def test_tritonserver_may_open_as_many_files_as_the_hard_limit_allows(tmp_path):
    """Every connection holds a descriptor: the server's soft limit is raised, whatever the launcher's was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # as a login shell's default
    try:
        with TritonServer(write_repository(tmp_path / "repo"), log_path=tmp_path / "server.log",
                          ready_timeout_s=120, **server_ports()) as server:
            assert open_files_limits(server.process.pid) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_missing_repository_fails_fast_with_log(tmp_path):
    server = TritonServer(tmp_path / "missing", log_path=tmp_path / "server.log", **server_ports())
    with pytest.raises(TritonServerError, match="exited with code") as failure:
        server.start()
    assert "failed to stat file" in str(failure.value)  # tritonserver's own words, from the log
    assert server.poll() is not None


def test_broken_model_reports_its_error(tmp_path):
    repo = write_repository(tmp_path / "repo", model_code="import no_such_module\n")
    server = TritonServer(repo, log_path=tmp_path / "server.log", **server_ports())
    with pytest.raises(TritonServerError, match="No module named 'no_such_module'"):
        server.start()
    assert group_members(server.process.pid) == []


def test_cli_serve_stops_on_sigterm(tmp_path):
    with launch_cli(tmp_path) as (cli, ports):
        try:
            lines = []
            for line in cli.stdout:
                lines.append(line)
                if line.startswith("Ctrl-C"):
                    break
            banner = "".join(lines)
            assert f"http:    http://127.0.0.1:{ports['http_port']}" in banner
            assert f"grpc:    127.0.0.1:{ports['grpc_port']}" in banner
            assert "models:  echo" in banner
        finally:
            cli.send_signal(signal.SIGTERM)
            assert cli.wait(timeout=30) == 0, cli.stderr.read()
    log = next((tmp_path / "home" / "triton" / "logs").glob("tritonserver-*.log")).read_text()
    assert "successfully unloaded 'echo'" in log


def lines_of(stream) -> queue.Queue:
    """A queue the lines of `stream` arrive in, read on a thread (so waiting for one has a deadline)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_idle_connections_past_the_open_file_limit_neither_end_the_launcher_nor_fill_the_disk(tmp_path):
    """Idle connections use up tritonserver's descriptors: it accepts nothing, answers no probe and logs every
    failed accept(). The launcher counts the failed probes and carries on; the log stays within its cap; once
    the connections close the server answers again. A low limit (256) makes the attack cheap."""
    cap = 256 << 10
    with launch_cli(tmp_path, "--open-files=256", f"--log-max-mb={cap / 2**20}", "--watchdog-interval=0.2") as (
            cli, ports):
        connections = []
        try:
            assert any(line.startswith("Ctrl-C") for line in cli.stdout)
            errors = lines_of(cli.stderr)
            url = f"http://127.0.0.1:{ports['http_port']}"
            for _ in range(400):  # far more than the 256 descriptors: the last ones wait in the listen backlog
                connections.append(socket.create_connection(("127.0.0.1", ports["http_port"]), timeout=30))
            while "health probe failed (1 in a row)" not in errors.get(timeout=120):
                pass
            log = tmp_path / "home" / "triton" / "logs" / f"tritonserver-{ports['http_port']}.log"
            assert wait_for(lambda: b"Too many open files" in log.read_bytes(), timeout_s=120)
        finally:
            for connection in connections:
                connection.close()
        assert wait_for(lambda: answers(f"{url}/v2/models/echo/ready"), timeout_s=120)
        assert cli.poll() is None  # the launcher survived
        # The flood's lines were counted, not written (the count comes at the latest REPORT_S after the flood).
        assert wait_for(lambda: re.search(rb"Too many open files\n\[the line above repeated \d+ more times\]",
                                          log.read_bytes()), timeout_s=120)
        assert all(path.stat().st_size <= cap for path in log.parent.glob(f"{log.name}*"))
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0


def test_log_level_reaches_every_model_as_its_log_level_parameter():
    args = build_parser().parse_args(["serve", "--log-level", "debug", "--set", "max_num_seqs=4"])
    assert model_settings(args) == {"max_num_seqs": "4", "log_level": "debug"}
    assert model_settings(build_parser().parse_args(["serve"])) == {}  # the repository is served as it is


@pytest.mark.parametrize(("option", "value"), [("--open-files", "0"), ("--open-files", "100"), ("--log-max-mb", "0"),
                                               ("--log-max-mb", "nan"), ("--log-max-mb", "-1")])
def test_limits_out_of_range_are_refused_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", option, value])
    assert option in capsys.readouterr().err
