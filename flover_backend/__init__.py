"""Temporal-fusion LLM serving: one inference loop over a compacting KV arena."""

import importlib

# Lazy, so light users (the Triton adapter's parsing, the launcher, clients) don't pay for importing torch.
_PUBLIC = {
    "Engine": "flover_backend.engine.engine",
    "RequestOutput": "flover_backend.engine.engine",
    "EngineConfig": "flover_backend.config",
    "SamplingParams": "flover_backend.sampling.params",
    "InvalidRequestError": "flover_backend.errors",
    "EngineDeadError": "flover_backend.errors",
    "EngineBusyError": "flover_backend.errors",
}
__all__ = ["Engine", "EngineBusyError", "EngineConfig", "EngineDeadError", "InvalidRequestError", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    """Import a public name on first use."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flover_backend' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
