"""Counters and a bounded log of the loop's recent iterations, read by metrics exporters and benchmarks."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

RECENT_ITERATIONS = 4096  # the log's bound: a server runs for months, and readers want only the newest


@dataclass(frozen=True)
class IterationRecord:
    """One iteration of the loop: who ran, what it cost."""

    seconds: float
    decode_seconds: float  # the fused decode forward alone
    num_decode: int  # requests decoded in the fused forward
    decode_span: int  # rows that forward covered (more than num_decode when holes are not compacted)
    num_prefill: int  # requests whose prompt was completed this iteration: each got its first token
    num_waiting: int


@dataclass
class EngineStats:
    """Running totals since start, the current queue sizes, and the most recent iterations."""

    num_running: int = 0
    num_waiting: int = 0
    num_iterations: int = 0
    num_generated_tokens: int = 0
    compaction_bytes: int = 0
    iterations: deque[IterationRecord] = field(default_factory=lambda: deque(maxlen=RECENT_ITERATIONS))

    def record(self, iteration: IterationRecord, moved_bytes: int) -> None:
        """Add one iteration to the totals and the log."""
        self.num_iterations += 1
        self.num_generated_tokens += iteration.num_decode + iteration.num_prefill
        self.compaction_bytes += moved_bytes
        self.iterations.append(iteration)

    def recent(self, count: int) -> list[IterationRecord]:
        """The newest `count` iterations still in the log, oldest first, without copying the whole log."""
        newest = list(itertools.islice(reversed(self.iterations), min(count, len(self.iterations))))
        return newest[::-1]
