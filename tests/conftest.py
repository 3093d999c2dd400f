"""Shared fixtures: every test run writes its built-in checkpoints and server files under one temp home."""

import warnings

import pytest

from tests.processes import kill_tree, server_children


@pytest.fixture(autouse=True)
def no_leaked_servers():
    """Kill, with all they started, the server processes a test left behind (a failed test's, say), so one
    failure never leaves servers holding ports, cores and memory for the rest of the run."""
    before = server_children()  # a module's server fixture is set up before this one, and kept
    yield
    leaked = server_children() - before
    for pid in leaked:
        kill_tree(pid)
    if leaked:
        warnings.warn(f"killed server processes the test left running: {sorted(leaked)}", stacklevel=1)


@pytest.fixture(scope="session", autouse=True)
def builtin_home(tmp_path_factory):
    """A fresh FLOVER_HOME for the session; tritonservers started by tests inherit it."""
    home = tmp_path_factory.mktemp("flover_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLOVER_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def tiny_checkpoint(builtin_home):
    """The built-in tiny checkpoint, written once per session under `builtin_home`."""
    from flover_backend.execution.models.builtin import (
        builtin_checkpoint,  # here: tests that never use it skip torch
    )

    return builtin_checkpoint("tiny")


@pytest.fixture(scope="session")
def sequence_logits():
    """`sequence_logits(engine, token_ids)`: the engine's model's raw logits after each prefix of `token_ids`,
    computed in one prefill outside the engine: (len, vocab)."""
    import torch

    from flover_backend.execution.kv_arena import KVArena
    from flover_backend.execution.layers.attention import ForwardBatch

    def logits(engine, token_ids: list[int]) -> torch.Tensor:
        model = engine.runner.model
        c = model.config
        kv = KVArena.for_model(c, 1, len(token_ids))
        batch = ForwardBatch.prefill(slice(0, 1), [len(token_ids)], torch.device("cpu"))
        with torch.no_grad():
            return model.compute_logits(model.forward(torch.tensor([token_ids]), batch, kv)[0])

    return logits


@pytest.fixture(scope="module")
def front(server, tmp_path_factory):
    """The OpenAI front beside the requesting module's own `server` fixture (a TritonServer)."""
    from flover_backend.ports import find_free_port
    from flover_backend.server.openai_launcher import OpenAIFront

    log = tmp_path_factory.mktemp("front") / "front.log"
    with OpenAIFront(server.grpc_url, port=find_free_port(), log_path=log, admin_key=server.admin_key) as running:
        yield running


@pytest.fixture(scope="module")
def client(front):
    """The official `openai` client of that front."""
    import openai

    return openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=120)
