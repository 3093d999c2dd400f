"""Attention over the KV arena: the one place a model reads or writes cached keys and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ForwardBatch:
    """Which arena rows one forward covers and where each row's new tokens sit.

    Prefill: every row starts at position 0, prompts right-padded to T; attention is causal over the
    fresh keys, so padding after a prompt is never seen by its real tokens.
    Decode: T == 1; row b writes its new key at `write_pos[b]` and attends to the cached keys where
    `key_mask[b]` is True (its own length only; holes in the batch see one dummy key).
    """

    rows: slice | torch.Tensor  # arena rows, one per batch entry (a slice when they are dense)
    positions: torch.Tensor  # (B, T) long: absolute position of each input token
    is_prefill: bool
    write_pos: torch.Tensor | None = None  # decode: (B,) long
    key_mask: torch.Tensor | None = None  # decode: (B, 1, 1, S) bool
    last_index: torch.Tensor | None = None  # prefill: (B,) index of each prompt's last token

    @property
    def num_key_positions(self) -> int:
        """How many cached positions a decode step reads per row."""
        assert self.key_mask is not None
        return self.key_mask.shape[-1]

    @classmethod
    def prefill(cls, rows: slice | torch.Tensor, prompt_lens: list[int], device: torch.device) -> ForwardBatch:
        """A batch that writes whole prompts (right-padded to the longest) into `rows`."""
        longest = max(prompt_lens)
        positions = torch.arange(longest, device=device).expand(len(prompt_lens), longest)
        last_index = torch.tensor([n - 1 for n in prompt_lens], device=device)
        return cls(rows=rows, positions=positions, is_prefill=True, last_index=last_index)

    @classmethod
    def decode(cls, rows: slice, context_lens: torch.Tensor) -> ForwardBatch:
        """A batch that appends one token per row at position `context_lens[b]` (0 for a hole)."""
        num_keys = int(context_lens.max()) + 1
        key_range = torch.arange(num_keys, device=context_lens.device)
        key_mask = (key_range[None, :] <= context_lens[:, None])[:, None, None, :]
        return cls(rows=rows, positions=context_lens[:, None], is_prefill=False,
                   write_pos=context_lens, key_mask=key_mask)


def arena_attention(
    q: torch.Tensor,  # (B, nh, T, hd), positions already applied
    k: torch.Tensor,  # (B, nkv, T, hd)
    v: torch.Tensor,  # (B, nkv, T, hd)
    k_cache: torch.Tensor,  # (max_num_seqs, nkv, max_model_len, hd): this layer's arena keys
    v_cache: torch.Tensor,
    batch: ForwardBatch,
) -> torch.Tensor:
    """Store this step's keys/values in the arena rows, then attend; returns (B, nh, T, hd)."""
    gqa = q.shape[1] != k.shape[1]
    if batch.is_prefill:
        num_tokens = k.shape[2]
        k_cache[batch.rows, :, :num_tokens] = k
        v_cache[batch.rows, :, :num_tokens] = v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    assert isinstance(batch.rows, slice), "decode covers a dense span of rows [0, n)"
    rows_k, rows_v = k_cache[batch.rows], v_cache[batch.rows]  # views: writes land in the arena
    batch_index = torch.arange(k.shape[0], device=k.device)
    rows_k[batch_index, :, batch.write_pos] = k[:, :, 0]
    rows_v[batch_index, :, batch.write_pos] = v[:, :, 0]
    num_keys = batch.num_key_positions
    return F.scaled_dot_product_attention(
        q, rows_k[:, :, :num_keys], rows_v[:, :, :num_keys], attn_mask=batch.key_mask, enable_gqa=gqa
    )
