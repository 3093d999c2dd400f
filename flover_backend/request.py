"""One request's state as it moves through the loop: waiting, running in an arena row, finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flover_backend.sampling.params import SamplingParams

if TYPE_CHECKING:  # the scheduler imports this module and no torch
    from flover_backend.sampling.logprobs import TokenLogprobs

if TYPE_CHECKING:
    from flover_backend.sampling.grammar import Guide


class RequestStatus(enum.IntEnum):
    """Where a request is; every finished state sorts after the live ones."""

    WAITING = 0
    RUNNING = 1
    FINISHED_LENGTH = 2
    FINISHED_STOP = 3
    FINISHED_ABORT = 4
    FINISHED_ERROR = 5

    @property
    def finished(self) -> bool:
        """Whether the request has left the loop for good."""
        return self >= RequestStatus.FINISHED_LENGTH

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason reported to clients, None while live."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_STOP: "stop",
    RequestStatus.FINISHED_ABORT: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}
FINISH_REASONS = tuple(_FINISH_REASONS.values())


@dataclass(eq=False)
class Request:
    """A prompt, its settings, and the tokens generated so far."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)  # time.monotonic(), as every timestamp here
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    row: int = -1  # arena row while running
    num_computed_tokens: int = 0  # prompt positions scheduled into the row so far (chunked prefill)
    num_prefix_cached_tokens: int = 0  # of those, copied from another row's keys rather than computed
    # Positions [0, kv_source_len) of the row are bit-for-bit the keys of prefix `kv_source` (prefix reuse
    # names one whenever a row is copied from), so rows naming the same source can read them from one row.
    kv_source: int | None = None
    kv_source_len: int = 0
    error: str | None = None
    cumulative_logprob: float = 0.0  # of the tokens generated so far, summed if the request asks for logprobs
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.. so far, if asked for
    admitted_time: float | None = None  # given a row
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None  # its final output handed to the caller
    guide: Guide | None = None  # the grammar its output follows (structured output), advanced token by token

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt in tokens."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """Whether part of the prompt is still to be written into the row (no token generated yet)."""
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def num_cached_tokens(self) -> int:
        """Positions of this request held in its arena row: the prompt plus all but the newest token."""
        if not self.output_token_ids:
            return self.num_computed_tokens
        return self.num_prompt_tokens + self.num_output_tokens - 1

    @property
    def last_token_id(self) -> int:
        """The newest token, the input of the request's next decode step."""
        return self.output_token_ids[-1]

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to admission into a row; None if never admitted."""
        return None if self.admitted_time is None else self.admitted_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first generated token; None before it."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds between consecutive generated tokens after the first; None with fewer than two."""
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        """Seconds from arrival to the final output; None while live."""
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    def record_token_time(self, now: float) -> None:
        """Stamp a token generated at `now`."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
