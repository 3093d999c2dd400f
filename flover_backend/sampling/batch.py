"""One step's sampled rows as tensors: their settings and their noise, built once for one batched pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flover_backend.sampling.params import SamplingParams

# The race draws one noise value per block of BLOCK_SIZE token ids and one per position inside a block:
# 250 + 128 values a row for a 32000-token vocabulary instead of 32000 (see sampling_pass).
BLOCK_SIZE = 128
# Logits first ranked for a top-p row without top-k; a row whose nucleus is wider is ranked again, wider.
NUCLEUS_WINDOW = 64
# torch.rand can return exactly 0, whose Exp(1) draw -log(0) is inf and would sink a kept token to -inf, level
# with the masked ones; it counts instead as the largest draw any other uniform gives, -log(2**-24).
MAX_LOG_NOISE = math.log(24 * math.log(2))


def num_blocks(vocab_size: int) -> int:
    """How many BLOCK_SIZE blocks cover the vocabulary, the last one padded."""
    return -(-vocab_size // BLOCK_SIZE)


@dataclass
class SamplingBatch:
    """What one sampling pass needs per sampled row, row i of each tensor being sampled row i.

    Penalties and min_tokens have already changed the logits of the rows that have them (the Sampler hands
    the pass their adjusted copies); logprobs are read off the raw logits, not off this pass.
    """

    temperature: torch.Tensor  # (n,) float32
    top_k: torch.Tensor  # (n,) int64; 0 keeps every token
    top_p: torch.Tensor  # (n,) float32; 1 keeps every token
    window: int  # logits ranked per row to find the top-k and top-p floors; 0 when no row has either
    has_top_p: bool
    log_noise: torch.Tensor  # (n, num_blocks + BLOCK_SIZE): log of Exp(1) draws from each row's own generator

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator], vocab_size: int,
              device: torch.device) -> SamplingBatch:
        """Tensors for rows with these settings, and this step's noise drawn from each row's generator."""
        top_k = [p.top_k if p.top_k < vocab_size else 0 for p in params]  # k >= vocab keeps every token
        nucleus_only = any(k == 0 and p.top_p < 1.0 for k, p in zip(top_k, params))
        # One past the largest k, so a row can tell whether a token past its k-th ties with it.
        window = min(vocab_size, max([k + 1 for k in top_k if k] + [NUCLEUS_WINDOW if nucleus_only else 0]))
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            window=window,
            has_top_p=any(p.top_p < 1.0 for p in params),
            log_noise=draw_log_noise(generators, num_blocks(vocab_size) + BLOCK_SIZE).to(device),
        )


def draw_log_noise(generators: list[torch.Generator], width: int) -> torch.Tensor:
    """(n, width) logs of Exp(1) draws on the CPU, row i from generators[i] only, so a seed gives the same
    noise on any device and in any batch. Each row is transformed on its own, so its rounding cannot depend
    on where the row sits in the batch."""
    rows = [torch.rand(width, generator=g).log_().neg_().log_() for g in generators]  # log(-log U) = log E
    return torch.stack(rows).clamp_max_(MAX_LOG_NOISE)
