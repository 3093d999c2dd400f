"""Counters, gauges and bounded logs of the loop's recent iterations and finished requests, for exporters."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flover_backend.request import FINISH_REASONS, Request

RECENT_RECORDS = 4096  # each log's bound: a server runs for months, and readers want only the newest

Record = TypeVar("Record")


@dataclass(frozen=True)
class IterationRecord:
    """One iteration of the loop: who ran, what it cost."""

    seconds: float
    decode_seconds: float  # the forward: decode rows (with graphs, alone; eagerly, with the prompt chunks too)
    num_decode: int  # requests decoded in the fused forward
    decode_span: int  # rows that forward covered (more than num_decode when holes are not compacted)
    num_prefill: int  # requests whose prompt was completed this iteration: each got its first token
    num_waiting: int
    num_prompt_tokens: int = 0  # prompt tokens prefilled at this boundary
    moved_bytes: int = 0  # KV bytes compaction copied before the forward
    compaction_seconds: float = 0.0
    prefix_queried_tokens: int = 0  # prompt tokens of the requests admitted at this boundary (prefix caching on)
    prefix_hit_tokens: int = 0  # of those, copied from a live or retained row's keys


@dataclass(frozen=True)
class FinishedRecord:
    """One request's end: its sizes, why it ended, and its timings in seconds (None where it never got that far)."""

    req_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    queue_time: float | None
    time_to_first_token: float | None
    time_per_output_token: float | None
    e2e_latency: float | None
    num_cached_tokens: int = 0  # prompt tokens whose keys were copied from another row (prefix reuse)

    @classmethod
    def of(cls, request: Request) -> FinishedRecord:
        """The record of a finished request."""
        return cls(request.req_id, request.status.finish_reason, request.num_prompt_tokens,
                   request.num_output_tokens, request.queue_time, request.time_to_first_token,
                   request.time_per_output_token, request.e2e_latency, request.num_prefix_cached_tokens)

    def describe(self) -> str:
        """One log line's worth: `key=value` pairs, times in seconds, '-' for those it never reached."""
        def seconds(value: float | None) -> str:
            """A duration for the log line, or '-' when the request never got that far."""
            return "-" if value is None else f"{value:.4f}s"

        return (f"finish_reason={self.finish_reason} prompt_tokens={self.num_prompt_tokens} "
                f"output_tokens={self.num_output_tokens} cached_tokens={self.num_cached_tokens} queue_time={seconds(self.queue_time)} "
                f"ttft={seconds(self.time_to_first_token)} tpot={seconds(self.time_per_output_token)} "
                f"e2e={seconds(self.e2e_latency)}")


class RecordLog(Generic[Record]):
    """The newest records of a stream and a count of all ever added, so a reader takes only what it has not seen.

    The loop thread appends while exporters read from theirs: a lock keeps each read a consistent snapshot.
    """

    def __init__(self, maxlen: int = RECENT_RECORDS):
        self._records: deque[Record] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.total = 0

    def append(self, record: Record) -> None:
        """Add one record; the oldest falls out once the log is full."""
        with self._lock:
            self._records.append(record)
            self.total += 1

    def since(self, seen: int) -> tuple[int, list[Record]]:
        """The total now, and the records added after the first `seen` that the log still holds, oldest first."""
        with self._lock:
            total = self.total
            newest = list(itertools.islice(reversed(self._records), min(total - seen, len(self._records))))
        return total, newest[::-1]

    def newest(self, count: int) -> list[Record]:
        """The newest `count` records still held, oldest first, without copying the whole log."""
        with self._lock:
            newest = list(itertools.islice(reversed(self._records), min(count, len(self._records))))
        return newest[::-1]

    def __iter__(self) -> Iterator[Record]:
        """Every record held, oldest first (a snapshot)."""
        with self._lock:
            return iter(list(self._records))


@dataclass
class EngineStats:
    """Totals since start, the current queue and arena use, and the most recent iterations and finished requests.

    Written by the loop thread only; `num_rows` and `kv_bytes_allocated` are the arena's fixed capacity.
    """

    num_rows: int = 0  # max_num_seqs
    kv_bytes_allocated: int = 0  # the whole KV arena, every tensor-parallel rank's share together
    num_running: int = 0
    num_waiting: int = 0
    kv_bytes_in_use: int = 0  # KV positions held by running requests, in bytes
    num_retained_rows: int = 0  # rows finished requests keep for prefix reuse (an arrival takes them back first)
    kv_bytes_retained: int = 0  # KV positions those rows hold, in bytes
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_generated_tokens: int = 0
    num_prompt_tokens: int = 0
    compaction_bytes: int = 0
    finish_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    iterations: RecordLog[IterationRecord] = field(default_factory=RecordLog)
    finished: RecordLog[FinishedRecord] = field(default_factory=RecordLog)

    @property
    def num_iterations(self) -> int:
        """Iterations run since start."""
        return self.iterations.total

    def record(self, iteration: IterationRecord) -> None:
        """Add one iteration to the totals and the log."""
        self.num_generated_tokens += iteration.num_decode + iteration.num_prefill
        self.num_prompt_tokens += iteration.num_prompt_tokens
        self.compaction_bytes += iteration.moved_bytes
        self.prefix_queried_tokens += iteration.prefix_queried_tokens
        self.prefix_hit_tokens += iteration.prefix_hit_tokens
        self.iterations.append(iteration)

    def record_finished(self, finished: FinishedRecord) -> None:
        """Count one finished request by its reason and add it to the log."""
        self.finish_reasons[finished.finish_reason] += 1
        self.finished.append(finished)

    def recent(self, count: int) -> list[IterationRecord]:
        """The newest `count` iterations still in the log, oldest first."""
        return self.iterations.newest(count)
