"""Polling for an eventual state with a bound, for tests against servers that publish it asynchronously."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    """Whether `predicate()` came true within `timeout_s` (polled every 10 ms)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
