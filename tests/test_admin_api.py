"""The admin APIs of a real tritonserver are shut to clients without the operator's key, on both protocols."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from flover_backend.ports import server_ports
from flover_backend.server.serve import TritonServer
from tests.echo_server import write_repository

pytestmark = pytest.mark.triton
EVIL_MODEL = """
from pathlib import Path
Path({marker!r}).write_text("ran")


class TritonPythonModel:
    def execute(self, requests):
        return None
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    repo = write_repository(tmp / "repo")
    with TritonServer(repo, log_path=tmp / "server.log", ready_timeout_s=120, admin_key="operator-secret",
                      **server_ports()) as running:
        yield running


def post(server, path: str, body: dict, headers: dict | None = None) -> int:
    request = urllib.request.Request(server.http_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def echo_works(server) -> bool:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return client.is_model_ready("echo")
    finally:
        client.close()


def load_with_code(marker) -> dict:
    """A load request that ships its own model.py: what an attacker would send to run code on the server."""
    code = base64.b64encode(EVIL_MODEL.format(marker=str(marker)).encode()).decode()
    return {"parameters": {"config": json.dumps({"backend": "python", "max_batch_size": 0}),
                           "file:1/model.py": code}}


def test_http_load_with_code_and_unload_are_refused_without_the_key(server, tmp_path):
    marker = tmp_path / "marker"
    assert post(server, "/v2/repository/models/evil/load", load_with_code(marker)) == 403
    assert post(server, "/v2/repository/models/echo/load", load_with_code(marker)) == 403  # replace ours
    assert post(server, "/v2/repository/models/echo/unload", {}) == 403
    wrong = {"flover-admin-key": "guess"}
    assert post(server, "/v2/repository/models/echo/unload", {}, wrong) == 403
    assert post(server, "/v2/repository/index", {}) == 403
    assert not marker.exists() and not (server.model_repository / "evil").exists()
    assert echo_works(server) and server.model_names() == ["echo"]


def test_grpc_load_and_unload_are_refused_without_the_key(server, tmp_path):
    marker = tmp_path / "marker"
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        code = base64.b64encode(EVIL_MODEL.format(marker=str(marker)).encode())
        with pytest.raises(InferenceServerException, match="restricted") as refused:
            client.load_model("evil", config=json.dumps({"backend": "python"}), files={"file:1/model.py": code})
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("echo")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
    finally:
        client.close()
    assert not marker.exists() and echo_works(server)


def test_the_operator_key_opens_them_on_both_protocols(server):
    assert post(server, "/v2/repository/models/echo/unload", {}, server.admin_headers) == 200
    assert server.model_names() == []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):  # the HTTP header is not gRPC's
            client.load_model("echo", headers=server.admin_headers)
        client.load_model("echo", headers=server.grpc_admin_headers)
        assert client.is_model_ready("echo")
    finally:
        client.close()

