"""Attention over the KV arena: the one place a model reads or writes cached keys and values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from flover_backend.native.attention import DecodeAttentionKernel, SharedPrefixGroups


class KVLayers(Protocol):
    """What a model sees of the KV arena (`kv_arena.KVArena`): each layer's cached keys and values."""

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (keys, values), each (rows, num_kv_heads, max_len, head_dim), views of the arena."""
        ...


@dataclass
class ForwardBatch:
    """Which arena rows one forward covers and where each row's new tokens sit.

    Prefill: row b writes prompt positions [starts[b], starts[b] + chunk_lens[b]), chunks right-padded to T.
    When every chunk starts at 0 attention is causal over the fresh keys alone, so padding after a prompt is
    never seen by its real tokens; a later chunk also attends to the positions its row already holds.
    Decode: T == 1; row b writes its new key at `write_pos[b]` and attends to the cached keys that
    `key_bias[b]` leaves open (its own length only; a row that is not decoding sees one dummy key).
    """

    rows: slice | torch.Tensor  # arena rows, one per batch entry (a slice when they are dense)
    positions: torch.Tensor  # (B, T) long: absolute position of each input token
    is_prefill: bool
    write_pos: torch.Tensor | None = None  # decode: (B,) long
    key_bias: torch.Tensor | None = None  # decode: (B, 1, 1, S) 0 where a row may attend, -inf elsewhere
    last_index: torch.Tensor | None = None  # prefill: (B,) index of each chunk's last token
    chunks: list[tuple[int, int]] | None = None  # prefill after a first chunk: (start, length) per row
    prefix_mask: torch.Tensor | None = None  # with `chunks`: (B, 1, T, S) True where a query sees a key
    kernel: DecodeAttentionKernel | None = None  # decode: store and attend through it rather than matmuls
    shared_prefixes: SharedPrefixGroups | None = None  # decode, with `kernel`: rows that read one prefix copy once
    parts: list[ForwardBatch] | None = None  # fused: batches whose tokens lie end to end in one (1, N) forward
    _write_index: dict = field(default_factory=dict)  # decode: flat arena offsets, built once per step
    _key_ranges: dict = field(default_factory=dict)  # decode: per sliding window, built once per step

    @property
    def num_key_positions(self) -> int:
        """How many cached positions a decode step reads per row."""
        assert self.key_bias is not None
        return self.key_bias.shape[-1]

    def sliding_key_bias(self, sliding_window: int) -> torch.Tensor:
        """`key_bias` that also hides, from each row, the keys `sliding_window` or more positions behind its new one."""
        key_positions = torch.arange(self.num_key_positions, device=self.key_bias.device)
        too_old = key_positions[None, :] <= self.write_pos[:, None] - sliding_window  # (B, S)
        return self.key_bias.masked_fill(too_old[:, None, None, :], -torch.inf)

    def key_ranges(self, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) first and one-past-last position each row attends to: what `key_bias` (and, with a window,
        `sliding_key_bias`) leave open, as ranges."""
        if sliding_window not in self._key_ranges:
            ends = self.positions[:, 0] + 1
            starts = (torch.zeros_like(ends) if sliding_window is None
                      else (self.write_pos - sliding_window + 1).clamp_min(0))
            self._key_ranges[sliding_window] = starts, ends
        return self._key_ranges[sliding_window]

    def write_index(self, k_cache: torch.Tensor) -> torch.Tensor:
        """(B * nkv,) offsets of each row's new position in a layer's cache seen as (-1, hd) (`flat_cache`).

        Every layer's cache has the same shape and strides, so the first layer builds them and the rest reuse them.
        """
        key = tuple(k_cache.shape)
        if key not in self._write_index:
            row_stride, head_stride, position_stride, _ = (stride // k_cache.shape[-1] for stride in k_cache.stride())
            device = self.write_pos.device
            rows = torch.arange(self.rows.start, self.rows.start + len(self.write_pos), device=device)
            heads = torch.arange(k_cache.shape[1], device=device)
            offsets = (rows[:, None] * row_stride + heads[None, :] * head_stride
                       + self.write_pos[:, None] * position_stride)
            self._write_index[key] = offsets.reshape(-1)
        return self._write_index[key]

    @classmethod
    def fused(cls, parts: list[ForwardBatch], num_tokens: int) -> ForwardBatch:
        """One forward of `num_tokens` tokens (1, N): each part's tokens in turn (a decode batch's one per row, a
        prompt chunk's), attending as that part alone would; tokens past the parts' are padding, attending to
        nothing. Every linear layer then reads its weights once for the whole iteration."""
        positions = torch.cat([part.positions.reshape(-1) for part in parts])
        padding = positions.new_zeros(num_tokens - len(positions))
        return cls(rows=slice(0, 0), positions=torch.cat([positions, padding])[None],
                   is_prefill=any(part.is_prefill for part in parts), parts=parts)

    @classmethod
    def prefill(cls, rows: slice | torch.Tensor, chunk_lens: list[int], device: torch.device,
                starts: list[int] | None = None, width: int = 0) -> ForwardBatch:
        """A batch that writes prompt chunks (right-padded to `width`, at least the longest) into `rows`, from
        `starts` (0s)."""
        longest = max(max(chunk_lens), width)
        offsets = torch.arange(longest, device=device)
        last_index = torch.tensor([n - 1 for n in chunk_lens], device=device)
        if not starts or not any(starts):
            return cls(rows=rows, positions=offsets.expand(len(chunk_lens), longest), is_prefill=True,
                       last_index=last_index)
        start = torch.tensor(starts, device=device)
        # Padding positions repeat the chunk's last one, so they stay inside the RoPE tables.
        positions = start[:, None] + torch.minimum(offsets[None, :], last_index[:, None])
        keys = torch.arange(max(s + n for s, n in zip(starts, chunk_lens)), device=device)
        prefix_mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        return cls(rows=rows, positions=positions, is_prefill=True, last_index=last_index,
                   chunks=list(zip(starts, chunk_lens)), prefix_mask=prefix_mask)

    @classmethod
    def decode(cls, rows: slice, context_lens: torch.Tensor, num_keys: int, dtype: torch.dtype = torch.float32,
               write_pos: torch.Tensor | None = None, kernel: DecodeAttentionKernel | None = None,
               shared_prefixes: SharedPrefixGroups | None = None) -> ForwardBatch:
        """A batch that appends one token per row at position `context_lens[b]`.

        A row in the span that is not decoding (a hole, or a prompt still being written) has context 0 and
        writes its dummy key at `write_pos[b]`: a scratch position no request uses (default: context_lens).
        `num_keys` is how many cached positions attention reads per row, at least the longest length + 1.
        It comes from the host: working it out from `context_lens` would read the device, which a CUDA
        graph cannot.
        """
        key_bias = None  # the kernel reads each row's own positions: no mask to build
        if kernel is None:
            key_range = torch.arange(num_keys, device=context_lens.device)
            hidden = (key_range[None, :] > context_lens[:, None])[:, None, None, :]
            key_bias = torch.zeros(hidden.shape, dtype=dtype, device=context_lens.device).masked_fill_(hidden,
                                                                                                      -torch.inf)
        return cls(rows=rows, positions=context_lens[:, None], is_prefill=False,
                   write_pos=context_lens if write_pos is None else write_pos, key_bias=key_bias,
                   kernel=kernel, shared_prefixes=shared_prefixes)


def arena_attention(
    q: torch.Tensor,  # (B, nh, T, hd), positions already applied
    k: torch.Tensor,  # (B, nkv, T, hd)
    v: torch.Tensor,  # (B, nkv, T, hd)
    k_cache: torch.Tensor,  # (max_num_seqs, nkv, max_model_len, hd): this layer's arena keys
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Store this step's keys/values in the arena rows, then attend; returns (B, nh, T, hd).

    With `sliding_window` (Mistral's), the query at position p sees only the keys at positions > p - sliding_window.
    The arena still keeps every key of a row: only the mask changes.
    """
    if batch.parts is not None:
        return _fused_attention(q, k, v, k_cache, v_cache, batch.parts, sliding_window)
    gqa = q.shape[1] != k.shape[1]
    if batch.is_prefill and batch.chunks is None:
        num_tokens = k.shape[2]
        k_cache[batch.rows, :, :num_tokens] = k
        v_cache[batch.rows, :, :num_tokens] = v
        if sliding_window is None or num_tokens <= sliding_window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        positions = torch.arange(num_tokens, device=q.device)
        behind = positions[:, None] - positions[None, :]  # (T, T): how far each key is behind each query
        visible = (behind >= 0) & (behind < sliding_window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
    if batch.is_prefill:
        rows = range(batch.rows.start, batch.rows.stop) if isinstance(batch.rows, slice) else batch.rows.tolist()
        for b, (row, (start, length)) in enumerate(zip(rows, batch.chunks)):
            k_cache[row, :, start:start + length] = k[b, :, :length]
            v_cache[row, :, start:start + length] = v[b, :, :length]
        num_keys = batch.prefix_mask.shape[-1]
        keys, values = k_cache[batch.rows, :, :num_keys], v_cache[batch.rows, :, :num_keys]
        visible = batch.prefix_mask
        if sliding_window is not None:
            key_positions = torch.arange(num_keys, device=q.device)
            visible = visible & (key_positions > batch.positions[:, :, None] - sliding_window)[:, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=gqa)
    assert isinstance(batch.rows, slice), "decode covers a dense span of rows [0, n)"
    if batch.kernel is not None:
        starts, ends = batch.key_ranges(sliding_window)
        return batch.kernel(q, k, v, k_cache[batch.rows], v_cache[batch.rows], batch.write_pos, starts, ends,
                            batch.shared_prefixes)
    head_dim = k.shape[-1]
    index = batch.write_index(k_cache)
    flat_cache(k_cache).index_copy_(0, index, k.reshape(-1, head_dim))
    flat_cache(v_cache).index_copy_(0, index, v.reshape(-1, head_dim))
    num_keys = batch.num_key_positions
    keys = k_cache[batch.rows, :, :num_keys]  # (B, nkv, S, hd) views of the arena, no copy
    values = v_cache[batch.rows, :, :num_keys]
    # A window that covers every key read changes nothing, so the common case builds no second mask.
    windowed = sliding_window is not None and num_keys > sliding_window
    return decode_attention(q, keys, values, batch.sliding_key_bias(sliding_window) if windowed else batch.key_bias)


def flat_cache(cache: torch.Tensor) -> torch.Tensor:
    """A layer's (rows, nkv, max_len, hd) cache, in either arena layout, as the (-1, hd) block of memory it spans."""
    head_dim = cache.shape[-1]
    return cache.as_strided((cache.numel() // head_dim, head_dim), (head_dim, 1))


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     parts: list[ForwardBatch], sliding_window: int | None) -> torch.Tensor:
    """Attention of a fused forward's (1, heads, N, hd) tokens, part by part; padding tokens get zeros."""
    outputs, offset = [], 0
    for part in parts:
        count = part.positions.numel()
        pieces = [t[0, :, offset:offset + count] for t in (q, k, v)]  # (heads, count, hd)
        if part.is_prefill:  # one prompt chunk: (1, heads, T, hd)
            out = arena_attention(*(p[None] for p in pieces), k_cache, v_cache, part, sliding_window)
        else:  # a token per row: (rows, heads, 1, hd)
            out = arena_attention(*(p.transpose(0, 1)[:, :, None] for p in pieces), k_cache, v_cache, part,
                                  sliding_window)
            out = out[:, :, 0].transpose(0, 1)[None]
        outputs.append(out)
        offset += count
    if offset < q.shape[2]:
        outputs.append(q.new_zeros(1, q.shape[1], q.shape[2] - offset, q.shape[3]))
    return torch.cat(outputs, dim=2)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """One query per row against its cached keys, as two batched matmuls.

    For a single query position this beats SDPA's CPU flash kernel (measured ~25% here), and grouping
    the query heads that share a KV head as rows of one matmul handles GQA without repeating the cache.
    """
    batch_size, num_heads, _, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    grouped = q.reshape(batch_size, num_kv_heads, num_heads // num_kv_heads, head_dim)  # (B, nkv, g, hd)
    # Scaled before the product: in bf16, scores rounded first and scaled after lose more bits.
    scores = torch.matmul(grouped * head_dim**-0.5, keys.transpose(-1, -2)).add_(key_bias)  # (B, nkv, g, S)
    out = torch.matmul(scores.softmax(dim=-1), values)  # (B, nkv, g, hd)
    return out.reshape(batch_size, num_heads, 1, head_dim)
