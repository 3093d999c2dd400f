"""The CPU sampling kernel (sampling.c): sampling_pass's floors and race for every sampled row in one call.

Ranking a row's nucleus with torch costs a topk as wide as the nucleus: on a 32000-token vocabulary, a
nucleus of ~300 tokens (temperature 0.8, top_p 0.9 on flat logits) took ~9 ms for 32 rows on the 2-core AMD EPYC (`make bench-sampling`), and the race
over many contending blocks ~1.5 ms more. The kernel looks again only at the tokens its blocks' maxima
cannot rule out, bins those by distance below the top, sorts only the bins where the k-th token and the
nucleus's end fall, and races over the masses it already computed.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from flover_backend.native.build import declare, load_library

SOURCE = Path(__file__).with_name("sampling.c")
_INT64, _POINTER = ctypes.c_int64, ctypes.c_void_p


class SamplingKernel:
    """The built kernel: each row's floor and its token."""

    def __init__(self, library: ctypes.CDLL):
        self._function = declare(library.flover_sample, [_POINTER, _INT64, _INT64, _INT64, *[_POINTER] * 5, _INT64,
                                                         _INT64, _POINTER, _POINTER], ctypes.c_int)

    def __call__(self, logits: torch.Tensor, temperature: torch.Tensor, top: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, log_noise: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (n,) int64 and floors (n,) float32 for float32 CPU `logits` (n, vocab), vocab a multiple of
        `block_size` (padded with -inf), with finite maxima `top` (n,) (largest logit / temperature). top_k 0 and top_p 1 leave a row's floor at -inf; a token tied
        with its floor stays. log_noise (n, ceil(vocab / block_size) + block_size) is each row's log Exp(1)
        draws: one per block of `block_size` ids, then one per position in a block."""
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        temperature, top, top_k, top_p, log_noise = (
            t.contiguous() for t in (temperature, top, top_k, top_p, log_noise))
        floors = torch.empty(len(logits), dtype=torch.float32)
        tokens = torch.empty(len(logits), dtype=torch.int64)
        status = self._function(logits.data_ptr(), len(logits), logits.shape[1], logits.stride(0),
                                temperature.data_ptr(), top.data_ptr(), top_k.data_ptr(), top_p.data_ptr(),
                                log_noise.data_ptr(), log_noise.shape[1], block_size, floors.data_ptr(),
                                tokens.data_ptr())
        if status == -2:
            raise ValueError(f"the vocabulary ({logits.shape[1]}) must be whole blocks of {block_size} ids, and a "
                             "block whole vectors of 16")
        if status:
            raise MemoryError("the sampling kernel could not allocate its scratch memory")
        return tokens, floors


@functools.cache
def load(build_dir: Path) -> SamplingKernel | None:
    """The kernel, built into `build_dir` on first use; None (logged once) where it cannot be built or loaded."""
    library = load_library(SOURCE, build_dir)
    return None if library is None else SamplingKernel(library)
