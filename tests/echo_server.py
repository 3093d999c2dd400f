"""A tiny decoupled echo model and its repository: a real tritonserver that starts in seconds, no engine."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from flover_backend.ports import server_ports
from flover_backend.triton_env import PROJECT_ROOT
from tests.processes import spawned

CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "module_path" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

# Streams "<text> 0", "<text> 1", "<text> 2", then an empty final response. The imports prove the stub's
# Python sees the project (flover_backend) and the environment's packages (torch).
MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils
{extra_import}
import flover_backend


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0]
            where = np.array([flover_backend.__file__.encode()], dtype=np.object_)
            for i in range(3):
                out = np.array([text + b" %d" % i], dtype=np.object_)
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", out), pb_utils.Tensor("module_path", where)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


def write_repository(root: Path, name: str = "echo", extra_import: str = "", model_code: str = MODEL) -> Path:
    """A model repository holding one decoupled python model; return the repository folder."""
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(CONFIG)
    (version_dir / "model.py").write_text(model_code.format(extra_import=extra_import))
    return root


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group `pgid`: tritonserver and its stubs."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@contextlib.contextmanager
def launch_cli(tmp_path: Path, *options: str, stderr=subprocess.PIPE):
    """`with launch_cli(tmp_path) as (process, ports):` `python -m flover_backend serve` on a fresh echo
    repository under `tmp_path` with `options`, as a user starts it, with its own FLOVER_HOME; its stdout is
    a text pipe. Killed with everything it started when the block ends, whatever happened in it."""
    ports = server_ports()
    repo = write_repository(tmp_path / "repo")
    args = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
    env = {**os.environ, "FLOVER_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "flover_backend", "serve", f"--model-repository={repo}", *args, *options]
    with spawned(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True) as cli:
        yield cli, ports
