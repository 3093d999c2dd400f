"""Repetition, presence and frequency penalties and min_tokens, for the rows that ask for them only.

Each request with penalties owns a row of token counts on the logits' device, filled from its prompt once and
then grown by its newest tokens only, so a step costs the same whatever the length of the history. A row's
logits change through elementwise operations on that row alone: no other row is read or written.
"""

from __future__ import annotations

import torch

from flover_backend.request import Request

_MIN_CAPACITY = 4


class TokenCounts:
    """For each request with penalties: how often each token was generated, and which tokens were seen at all
    (in the prompt or the output), as rows of two (capacity, vocab) tensors that grow as more requests need one."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)  # generated, per token
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # in the prompt or the output
        self._slots: dict[str, list[int]] = {}  # req_id -> [row, output tokens counted so far]
        self._free: list[int] = []

    def rows(self, requests: list[Request]) -> torch.Tensor:
        """The rows of `requests` (a tensor of indices), each brought up to date with its tokens so far."""
        slot_ids, token_ids, seen_slots, seen_ids = [], [], [], []
        for request in requests:
            slot = self._slots.get(request.req_id)
            if slot is None:
                slot = self._slots[request.req_id] = [self._take_row(), 0]
                # A tokenizer may know ids past the model's vocabulary: those have no logit to penalize.
                prompt_ids = [t for t in request.prompt_token_ids if t < self.vocab_size]
                seen_slots += [slot[0]] * len(prompt_ids)
                seen_ids += prompt_ids
            new = request.output_token_ids[slot[1]:]
            slot_ids += [slot[0]] * len(new)
            token_ids += new
            slot[1] = request.num_output_tokens
        if token_ids:
            index = torch.tensor([slot_ids, token_ids], device=self.device)
            self.counts.index_put_((index[0], index[1]), torch.ones(len(token_ids), device=self.device),
                                   accumulate=True)
            self.seen[index[0], index[1]] = True
        if seen_ids:
            index = torch.tensor([seen_slots, seen_ids], device=self.device)
            self.seen[index[0], index[1]] = True
        return torch.tensor([self._slots[request.req_id][0] for request in requests], device=self.device)

    def release(self, req_id: str) -> None:
        """Free a finished request's row for the next request with penalties."""
        slot = self._slots.pop(req_id, None)
        if slot is not None:
            self._free.append(slot[0])

    def _take_row(self) -> int:
        """A cleared row: a freed one, or one of the rows added when the tensors double."""
        if not self._free:
            capacity = len(self.counts)
            grown = max(_MIN_CAPACITY, 2 * capacity)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grown - capacity, self.vocab_size)])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grown - capacity, self.vocab_size)])
            self._free = list(range(grown - 1, capacity - 1, -1))
        row = self._free.pop()
        self.counts[row] = 0.0
        self.seen[row] = False
        return row


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, requests: list[Request]) -> None:
    """Penalize float32 `logits` (n, vocab) in place, row i by requests[i]'s settings, given its `counts` and
    `seen` rows: repetition as HF and vLLM (a seen token's logit divided by the penalty if positive, multiplied
    if not), then frequency and presence as OpenAI (minus the penalty per generation, and once if generated)."""
    params = [request.params for request in requests]
    if any(p.repetition_penalty != 1.0 for p in params):
        penalty = _column([p.repetition_penalty for p in params], logits.device)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        torch.where(seen, penalized, logits, out=logits)
    if any(p.frequency_penalty != 0.0 for p in params):
        logits.sub_(_column([p.frequency_penalty for p in params], logits.device) * counts)
    if any(p.presence_penalty != 0.0 for p in params):
        logits.sub_(_column([p.presence_penalty for p in params], logits.device) * (counts > 0))


def mask_stop_tokens(logits: torch.Tensor, requests: list[Request], eos_token_ids: frozenset[int]) -> None:
    """Set to -inf, in place, the logits of the tokens that would end each request still short of its
    min_tokens: its stop token ids, and eos unless it ignores eos (ids past the vocabulary are never drawn)."""
    rows, token_ids = [], []
    for row, request in enumerate(requests):
        for token_id in min_tokens_blocked(request, eos_token_ids):
            if token_id < logits.shape[1]:
                rows.append(row)
                token_ids.append(token_id)
    if token_ids:
        index = torch.tensor([rows, token_ids], device=logits.device)
        logits[index[0], index[1]] = float("-inf")


def min_tokens_blocked(request: Request, eos_token_ids: frozenset[int]) -> frozenset[int]:
    """The tokens `request` may not draw this step because it has fewer than min_tokens (none past them)."""
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        return frozenset()
    return params.ending_token_ids(eos_token_ids)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]
