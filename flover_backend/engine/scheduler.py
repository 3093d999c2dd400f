"""Iteration-level scheduling: who joins, who leaves and which rows move at each boundary. Pure Python."""

from __future__ import annotations

from collections import deque

from flover_backend.config import EngineConfig
from flover_backend.engine.prefix_cache import PrefixCache
from flover_backend.execution.iteration import PrefillChunk, SchedulerOutput
from flover_backend.execution.row_table import RowTable
from flover_backend.request import Request, RequestStatus


class Scheduler:
    """Waiting queue, running set and the admission policy (`fused`, `window` or `solo`)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        max_retained = min(config.max_retained_prefixes, config.max_num_seqs) if config.prefix_caching else 0
        self.rows = RowTable(config.max_num_seqs, config.compaction, max_retained)
        self.prefixes = PrefixCache(self.rows) if config.prefix_caching else None
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self._pending_aborts: set[str] = set()
        self._finished_req_ids: list[str] = []

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
        """The iteration boundary: apply aborts, compact freed rows, admit arrivals, hand out prompt chunks."""
        out = SchedulerOutput(aborted=self._apply_aborts())
        out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, []
        cached = {req_id: req.num_cached_tokens for req_id, req in self.running.items()}
        if self.prefixes is not None:
            cached |= self.prefixes.lengths()
        out.moves = self.rows.plan_compaction(cached)
        for move in out.moves:
            if self.rows.is_live(move.dst):  # else a retained row, which the table itself tracks
                self.running[self.rows.owner(move.dst)].row = move.dst
        out.decode = sorted((req for req in self.running.values() if not req.is_prefilling), key=lambda req: req.row)
        out.decode_span = out.decode[-1].row + 1 if out.decode else 0
        for request in self._admit(now):
            request.status = RequestStatus.RUNNING
            request.admitted_time = now
            request.row = self.rows.allocate(request.req_id)
            # Copies run in order after the moves, so a donor may be an arrival given its own copy just before.
            copy = self.prefixes.reuse(request, self.running.values()) if self.prefixes is not None else None
            if copy is not None:
                out.prefix_copies.append(copy)
            self.running[request.req_id] = request
            out.admitted.append(request)
        out.prefill = self._prompt_chunks()
        return out

    def _prompt_chunks(self) -> list[PrefillChunk]:
        """The next chunk of every prompt still being written, oldest first, within the per-iteration budget.

        A long prompt then enters over several iterations, and the requests already decoding keep their pace.
        """
        budget = self.config.max_prefill_tokens or float("inf")
        chunks = []
        for request in self.running.values():  # admission order
            if budget <= 0:
                break
            if request.is_prefilling:
                start = request.num_computed_tokens
                end = int(min(request.num_prompt_tokens, start + budget))
                chunks.append(PrefillChunk(request, start, end))
                request.num_computed_tokens = end
                budget -= end - start
        return chunks

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request now; its row becomes a hole that the next boundary compacts."""
        assert status.finished
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            # A failed request's row may hold keys its forward never finished writing: never a donor.
            if self.prefixes is not None and status != RequestStatus.FINISHED_ERROR:
                self.prefixes.retain(request)  # keeps the row for the keys it holds, or frees it
            else:
                self.rows.release(request.row)
            del self.running[request.req_id]
        else:
            self.waiting.remove(request)
        request.status = status
        self._finished_req_ids.append(request.req_id)

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
            budget = self.rows.num_available
        elif policy == "solo":
            budget = 0 if self.running else 1
        elif self.seconds_until_admission(now) == 0.0:  # the batch has drained and the window closed
            budget = min(self.config.batch_limit, self.rows.num_available)
        else:
            budget = 0
        return [self.waiting.popleft() for _ in range(min(budget, len(self.waiting)))]
