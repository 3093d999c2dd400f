"""Iteration-level scheduling: who joins, who leaves and which rows move at each boundary. Pure Python."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from flover_backend.config import EngineConfig
from flover_backend.request import Request, RequestStatus
from flover_backend.row_table import RowMove, RowTable


@dataclass
class SchedulerOutput:
    """What one iteration runs: row moves, then one decode forward, then the admitted prompts' prefill."""

    moves: list[RowMove] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)  # in row order
    decode_span: int = 0  # the decode forward covers rows [0, decode_span)
    prefill: list[Request] = field(default_factory=list)
    aborted: list[Request] = field(default_factory=list)  # left the loop at this boundary

    @property
    def scheduled(self) -> list[Request]:
        """Requests that get a token this iteration, in the order the sampled ids come back."""
        return self.decode + self.prefill

    @property
    def is_empty(self) -> bool:
        """Nothing to run and nothing to report."""
        return not (self.decode or self.prefill or self.aborted)


class Scheduler:
    """Waiting queue, running set and the admission policy (`fused`, `window` or `solo`)."""

    def __init__(self, config: EngineConfig, eos_token_ids: set[int]):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.rows = RowTable(config.max_num_seqs, config.compaction)
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self._pending_aborts: set[str] = set()

    @property
    def num_waiting(self) -> int:
        """Requests queued for a row."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a row."""
        return len(self.running)

    def has_work(self) -> bool:
        """Whether a `schedule()` now could do anything."""
        return bool(self.waiting or self.running or self._pending_aborts)

    def add_request(self, request: Request) -> None:
        """Queue a validated request; it joins at a boundary the policy picks."""
        self.waiting.append(request)

    def abort(self, req_id: str) -> None:
        """Have `req_id` leave at the next boundary, waiting or running."""
        self._pending_aborts.add(req_id)

    def seconds_until_admission(self, now: float) -> float | None:
        """How long a waiting request must still wait for its window to close; None if not waiting on one."""
        if self.config.policy != "window" or not self.waiting or self.running:
            return None
        if len(self.waiting) >= self.config.batch_limit:
            return 0.0
        return max(0.0, self.waiting[0].arrival_time + self.config.window_ms / 1000 - now)

    def schedule(self, now: float) -> SchedulerOutput:
        """The iteration boundary: apply aborts, compact freed rows, admit arrivals."""
        out = SchedulerOutput(aborted=self._apply_aborts())
        cached = {req_id: req.num_cached_tokens for req_id, req in self.running.items()}
        out.moves = self.rows.plan_compaction(cached)
        for move in out.moves:
            self.running[self.rows.owner(move.dst)].row = move.dst
        out.decode = sorted(self.running.values(), key=lambda req: req.row)
        out.decode_span = self.rows.span
        for request in self._admit(now):
            request.status = RequestStatus.RUNNING
            request.row = self.rows.allocate(request.req_id)
            self.running[request.req_id] = request
            out.prefill.append(request)
        return out

    def update_from_output(self, out: SchedulerOutput, sampled_ids: list[int]) -> None:
        """Append each scheduled request's new token and retire those it finishes; a request already
        finished (its sampling failed this iteration) gets no token."""
        for request, token_id in zip(out.scheduled, sampled_ids, strict=True):
            if request.status.finished:
                continue
            request.output_token_ids.append(token_id)
            if token_id in request.params.stop_token_ids or (
                token_id in self.eos_token_ids and not request.params.ignore_eos
            ):
                self.finish(request, RequestStatus.FINISHED_STOP)
            elif request.num_output_tokens >= request.params.max_tokens:
                self.finish(request, RequestStatus.FINISHED_LENGTH)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request now; its row becomes a hole that the next boundary compacts."""
        assert status.finished
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.rows.release(request.row)
            del self.running[request.req_id]
        else:
            self.waiting.remove(request)
        request.status = status

    def _apply_aborts(self) -> list[Request]:
        aborted = []
        by_id = {req.req_id: req for req in self.waiting} | self.running
        for req_id in self._pending_aborts:
            request = by_id.get(req_id)
            if request is not None:
                self.finish(request, RequestStatus.FINISHED_ABORT)
                aborted.append(request)
        self._pending_aborts.clear()
        return aborted

    def _admit(self, now: float) -> list[Request]:
        policy = self.config.policy
        if policy == "fused":
            budget = self.rows.num_free
        elif policy == "solo":
            budget = 0 if self.running else 1
        elif self.seconds_until_admission(now) == 0.0:  # the batch has drained and the window closed
            budget = min(self.config.batch_limit, self.rows.num_free)
        else:
            budget = 0
        return [self.waiting.popleft() for _ in range(min(budget, len(self.waiting)))]
