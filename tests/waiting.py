"""Polling for an eventual state with a bound, for tests against servers that publish it asynchronously."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float = 30.0):
    """`predicate()`'s first truthy value within `timeout_s` (polled every 10 ms), else its last falsy one."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            return value
        time.sleep(0.01)
    return value
