"""Shared fixtures: every test run writes its built-in checkpoints and server files under one temp home."""

import pytest


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
    from flover_backend.models.builtin import builtin_checkpoint  # here: tests that never use it skip torch

    return builtin_checkpoint("tiny")
