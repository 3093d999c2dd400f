"""Free ports picked together are distinct, so one server never gets one port for two listeners."""

from __future__ import annotations

import socket

from flover_backend.ports import free_ports, server_ports


def test_ports_picked_together_are_distinct_and_bindable():
    names = [f"port{i}" for i in range(64)]
    ports = free_ports(*names)
    assert list(ports) == names
    assert len(set(ports.values())) == len(names)
    for port in ports.values():  # all released again: a server can listen on each
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_server_ports_are_tritonservers_keyword_arguments():
    ports = server_ports()
    assert set(ports) == {"http_port", "grpc_port", "metrics_port"}
    assert len(set(ports.values())) == 3
