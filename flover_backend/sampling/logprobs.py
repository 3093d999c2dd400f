"""Per-token logprobs for the rows that ask: the chosen token's, its rank, and the most likely alternatives.

They are of the model's raw distribution, log_softmax of the logits before penalties, temperature, top-k and
top-p: vLLM's default (`logprobs_mode="raw_logprobs"`), so a token's logprob does not depend on how it was drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Prompt positions whose logits exist at once: a chunk's logits are positions x vocab floats, so a long chunk
# (thousands of positions, a 128k vocabulary) goes through the LM head in slices of this many.
PROMPT_LOGITS_SLICE = 256


@dataclass
class TokenLogprobs:
    """One generated token's logprob and rank (1 = most likely), and the `logprobs` most likely tokens, in order."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


def token_logprobs(logits: torch.Tensor, rows: list[int], token_ids: list[int],
                   num_top: list[int]) -> list[TokenLogprobs]:
    """For each of `rows` of `logits` (n, vocab): its chosen token token_ids[i]'s logprob and rank, and its
    num_top[i] most likely tokens; computed where the logits are and brought to the host in one copy."""
    device = logits.device
    picked = logits[torch.tensor(rows, device=device)] if len(rows) < len(logits) else logits
    logprobs = torch.log_softmax(picked.float(), dim=-1)  # (m, vocab)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=device)[:, None])  # (m, 1)
    rank = (logprobs >= chosen).sum(-1, keepdim=True)  # as vLLM counts it: tokens at least as likely
    columns = [chosen, rank.float()]  # ids and ranks are exact in float32 below 2**24
    width = max(num_top)
    if width:
        top = logprobs.topk(width)
        columns += [top.values, top.indices.float()]
    packed = torch.cat(columns, dim=1).tolist()
    return [TokenLogprobs(token_id, row[0], int(row[1]), [int(t) for t in row[2 + width:2 + width + n]],
                          row[2:2 + n])
            for token_id, n, row in zip(token_ids, num_top, packed)]


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor,
                    targets: list[int], num_top: int) -> list[TokenLogprobs]:
    """Each target prompt token's logprob given the tokens before it: `states` (>= len(targets), hidden) are the
    hidden states of the positions just before them; the LM head runs on those rows only, a slice at a time."""
    entries: list[TokenLogprobs] = []
    for begin in range(0, len(targets), PROMPT_LOGITS_SLICE):
        part = targets[begin:begin + PROMPT_LOGITS_SLICE]
        logits = compute_logits(states[begin:begin + len(part)])
        entries += token_logprobs(logits, list(range(len(part))), part, [num_top] * len(part))
    return entries


def vllm_logprobs(entries: list[TokenLogprobs], decode) -> list[dict[str, dict]]:
    """vLLM's shape, as Triton's vLLM backend sends it: per token, {token id: {logprob, rank, decoded_token}},
    the chosen token first, then the alternatives most likely first (the chosen one once if among them).
    `decode(ids)` gives each id's text."""
    shaped = []
    for entry in entries:
        ids = [entry.token_id, *entry.top_token_ids]
        values = [(entry.logprob, entry.rank)] + [(lp, i + 1) for i, lp in enumerate(entry.top_logprobs)]
        texts = decode(ids)
        step: dict[str, dict] = {}
        for token_id, (logprob, rank), text in zip(ids, values, texts):
            step.setdefault(str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": text})
        shaped.append(step)
    return shaped
