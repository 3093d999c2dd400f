"""Prefix reuse: which arena rows hold which tokens' keys, and the longest start of a new prompt one of them holds.

A row's keys and values at position p depend on tokens [0, p] only (attention is causal; RoPE and learned
positions are applied before the keys are written, and a sliding window only masks), so a new request
whose prompt starts with the same tokens can copy them from any row that holds them, at the same
positions, and compute only the rest. Donors are running requests and retained finished ones (`RowTable`).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable

from flover_backend.execution.row_table import RowMove, RowTable
from flover_backend.request import Request

# A row that computed its keys itself is the source of all of them.
WHOLE_ROW = sys.maxsize

# Shorter matches (a BOS token, a chat template's first line) are not copied: the rest of the prompt would then be
# a chunk that starts past 0, which attends through a mask (and, on a GPU, replays no prefill graph), costing more
# than the few positions save. Past this, any length is reused, not whole blocks only.
MIN_REUSE_TOKENS = 8


def common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`; list slices compare in C, halving the span."""
    limit = min(limit, len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class PrefixCache:
    """The tokens each retained row holds keys for, and the choice of donor for a new prompt."""

    def __init__(self, rows: RowTable):
        self.rows = rows
        self._tokens: dict[str, list[int]] = {}  # retained req_id -> the tokens its row holds keys for
        self._sources: dict[str, tuple[int | None, int]] = {}  # retained req_id -> its (kv_source, kv_source_len)
        self._source_ids = itertools.count()  # engine-made: a client's request ids may repeat

    def retain(self, request: Request) -> bool:
        """Keep a finishing request's row for the tokens it holds; False (and the row freed) if it is not kept."""
        tokens = (request.prompt_token_ids + request.output_token_ids)[:request.num_cached_tokens]
        if not tokens:
            self.rows.release(request.row)
            return False
        if not self.rows.retain(request.row):  # the table retains nothing: it freed the row
            return False
        self._tokens[request.req_id] = tokens
        self._sources[request.req_id] = request.kv_source, request.kv_source_len
        self._forget_dropped()
        return True

    def lengths(self) -> dict[str, int]:
        """Each retained row's used positions (what compaction copies when it moves one)."""
        self._forget_dropped()
        return {req_id: len(tokens) for req_id, tokens in self._tokens.items()}

    def reuse(self, request: Request, running: Iterable[Request]) -> RowMove | None:
        """The copy that gives `request` (just given its row) the longest prefix of its prompt a running or
        retained row holds, recorded on the request as computed; None if no row holds any.

        At least the prompt's last token is left to compute: its hidden state gives the first token. A request
        asking for prompt logprobs computes its whole prompt (copied positions have no logits), as vLLM does.
        """
        if request.params.prompt_logprobs is not None:
            return None
        prompt = request.prompt_token_ids
        limit = len(prompt) - 1
        best_len, best_row, best_retained, best_running = MIN_REUSE_TOKENS - 1, -1, None, None
        for donor in running:
            if donor is request or donor.num_cached_tokens <= best_len:
                continue
            held = donor.prompt_token_ids if donor.num_cached_tokens <= donor.num_prompt_tokens \
                else donor.prompt_token_ids + donor.output_token_ids
            length = common_prefix_len(prompt, held, min(limit, donor.num_cached_tokens))
            if length > best_len:
                best_len, best_row, best_retained, best_running = length, donor.row, None, donor
        self._forget_dropped()
        for req_id, row in self.rows.retained.items():
            tokens = self._tokens[req_id]
            if len(tokens) <= best_len:
                continue
            length = common_prefix_len(prompt, tokens, limit)
            if length > best_len:
                best_len, best_row, best_retained, best_running = length, row, req_id, None
        if best_len < MIN_REUSE_TOKENS:
            return None
        if best_retained is not None:
            self.rows.touch(best_retained)
        request.num_computed_tokens = request.num_prefix_cached_tokens = best_len
        self._name_source(request, best_len, best_running, best_retained)
        return RowMove(best_row, request.row, best_len)

    def _name_source(self, request: Request, length: int, running: Request | None, retained: str | None) -> None:
        """Record which prefix `request`'s copied positions [0, length) are, naming the donor's keys a source first
        if they have none. A donor that itself holds a copy of a shorter prefix passes on that prefix only, so
        every row naming a source holds that source's bits up to its kv_source_len."""
        source, source_len = (running.kv_source, running.kv_source_len) if running is not None \
            else self._sources[retained]
        if source is None:
            source, source_len = next(self._source_ids), WHOLE_ROW
            if running is not None:
                running.kv_source, running.kv_source_len = source, source_len
            else:
                self._sources[retained] = source, source_len
        request.kv_source, request.kv_source_len = source, min(length, source_len)

    def _forget_dropped(self) -> None:
        """Drop the tokens of rows the table no longer retains (taken by an arrival, evicted, compacted away)."""
        kept = self.rows.retained
        if self._tokens.keys() != kept.keys():
            self._tokens = {req_id: tokens for req_id, tokens in self._tokens.items() if req_id in kept}
            self._sources = {req_id: source for req_id, source in self._sources.items() if req_id in kept}
