"""What one iteration runs, as the scheduler decides it and the runner takes it: row moves, decode rows, prompt chunks."""

from __future__ import annotations

from dataclasses import dataclass, field

from flover_backend.execution.row_table import RowMove
from flover_backend.request import Request


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions [start, end) of a request to write into its row this iteration."""

    request: Request
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        """Whether this chunk completes the prompt, so the request gets its first token from it."""
        return self.end == self.request.num_prompt_tokens


@dataclass
class SchedulerOutput:
    """What one iteration runs: row moves, then one decode forward, then prompt chunks."""

    moves: list[RowMove] = field(default_factory=list)
    prefix_copies: list[RowMove] = field(default_factory=list)  # after the moves: an arrival's prompt start, copied
    decode: list[Request] = field(default_factory=list)  # in row order
    decode_span: int = 0  # the decode forward covers rows [0, decode_span); rows in it not decoding are dummies
    prefill: list[PrefillChunk] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # took a row at this boundary
    aborted: list[Request] = field(default_factory=list)  # left the loop at this boundary
    finished_req_ids: list[str] = field(default_factory=list)  # left since the last boundary: drop their state

    @property
    def scheduled(self) -> list[Request]:
        """Requests that get a token this iteration, in the order the sampled ids come back."""
        return self.decode + [chunk.request for chunk in self.prefill if chunk.is_last]

    @property
    def has_forward(self) -> bool:
        """Whether the iteration runs the model at all (a prompt's first chunks produce no token)."""
        return bool(self.decode or self.prefill)
