"""Counters and a per-iteration log of the loop, read by metrics exporters and benchmarks."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class IterationRecord:
    """One iteration of the loop: who ran, what it cost."""

    time: float  # monotonic clock at the end of the iteration
    seconds: float
    num_decode: int  # requests decoded in the fused forward
    decode_span: int  # rows that forward covered (more than num_decode when holes are not compacted)
    num_prefill: int  # requests admitted at this boundary
    num_waiting: int
    num_moves: int
    moved_bytes: int
    compaction_seconds: float
    decode_seconds: float
    prefill_seconds: float

    @property
    def num_generated_tokens(self) -> int:
        """Tokens this iteration produced: one per decoded request and one per admitted prompt."""
        return self.num_decode + self.num_prefill


@dataclass
class EngineStats:
    """Running totals since start; the most recent iterations are kept for plots."""

    num_running: int = 0
    num_waiting: int = 0
    num_finished: int = 0
    num_iterations: int = 0
    num_generated_tokens: int = 0
    compaction_bytes: int = 0
    compaction_seconds: float = 0.0
    busy_seconds: float = 0.0
    last_iteration_seconds: float = 0.0
    iterations: deque[IterationRecord] = field(default_factory=lambda: deque(maxlen=100_000))

    def record(self, it: IterationRecord) -> None:
        """Add one iteration to the totals and the log."""
        self.num_iterations += 1
        self.num_generated_tokens += it.num_generated_tokens
        self.compaction_bytes += it.moved_bytes
        self.compaction_seconds += it.compaction_seconds
        self.busy_seconds += it.seconds
        self.last_iteration_seconds = it.seconds
        self.iterations.append(it)
