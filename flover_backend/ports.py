"""Free TCP ports: for the tensor-parallel ranks' rendezvous, and for servers started by tests and benchmarks."""

from __future__ import annotations

import contextlib
import socket


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it first)."""
    return free_ports("port", host=host)["port"]


def free_ports(*names: str, host: str = "127.0.0.1") -> dict[str, int]:
    """One distinct free TCP port per name (another process may still take one first).

    Every socket stays bound until all are picked: ports picked one after another may repeat, since the
    kernel can hand a just-closed ephemeral port out again (CI once got HTTP and gRPC on one port).
    """
    with contextlib.ExitStack() as stack:
        ports = {}
        for name in names:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports[name] = sock.getsockname()[1]
        return ports


def server_ports(host: str = "127.0.0.1") -> dict[str, int]:
    """Distinct free HTTP, gRPC and metrics ports for one tritonserver, as `TritonServer`'s keyword arguments."""
    return free_ports("http_port", "grpc_port", "metrics_port", host=host)
