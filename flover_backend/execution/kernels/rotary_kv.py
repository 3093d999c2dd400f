"""Rotary on q and k fused with the write of k and v into the KV arena: one pass over the qkv projection's output
where torch runs a gather, two `cat`s, four multiplies and an index copy per tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flover_backend.execution.models.llama import apply_rope


@triton.jit
def _rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, rows_ptr, k_cache_ptr, v_cache_ptr,
                      token_stride, table_stride, cache_row_stride, cache_head_stride, cache_pos_stride,
                      num_heads, num_kv_heads, head_dim, half,
                      HALF_BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # q heads, then k heads, then v heads
    offsets = tl.arange(0, HALF_BLOCK)
    mask = offsets < half
    base = qkv_ptr + token * token_stride + head * head_dim
    first = tl.load(base + offsets, mask=mask, other=0.0)
    second = tl.load(base + half + offsets, mask=mask, other=0.0)
    if head < num_heads + num_kv_heads:  # q and k rotate; v does not
        position = tl.load(positions_ptr + token).to(tl.int64)
        table = position * table_stride
        cos1 = tl.load(cos_ptr + table + offsets, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + half + offsets, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + offsets, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + half + offsets, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin in float32, each product and the sum rounded to the model's dtype as
        # torch's operators round them.
        dtype = first.dtype
        x1, x2 = first.to(tl.float32), second.to(tl.float32)
        first = ((x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        second = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
        tl.store(base + offsets, first, mask=mask)
        tl.store(base + half + offsets, second, mask=mask)
    if head >= num_heads:
        kv_head = head - num_heads
        cache_ptr = k_cache_ptr
        if head >= num_heads + num_kv_heads:
            kv_head = kv_head - num_kv_heads
            cache_ptr = v_cache_ptr
        position = tl.load(positions_ptr + token).to(tl.int64)
        row = tl.load(rows_ptr + token).to(tl.int64)
        slot = cache_ptr + row * cache_row_stride + kv_head * cache_head_stride + position * cache_pos_stride
        tl.store(slot + offsets, first, mask=mask)
        tl.store(slot + half + offsets, second, mask=mask)


def rotary_kv(qkv: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """Rotate q and k of every token in place in `qkv` (tokens, (num_heads + 2 * num_kv_heads) * head_dim) and
    write its k and v into the arena at (rows[t], head, positions[t]).

    `cos`/`sin` are the model's (max_positions, head_dim) tables; `k_cache`/`v_cache` a layer's (arena rows,
    num_kv_heads, max_model_len, head_dim) view, in either arena layout.
    """
    head_dim = k_cache.shape[-1]
    if qkv.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or head_dim % 2:
        raise ValueError("rotary_kv needs contiguous token rows, an even head_dim and k and v caches of one layout")
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rotary_kv needs cos and sin tables of one contiguous layout")
    row_stride, head_stride, position_stride, _ = k_cache.stride()
    grid = (qkv.shape[0], num_heads + 2 * num_kv_heads)
    _rotary_kv_kernel[grid](qkv, cos, sin, positions, rows, k_cache, v_cache, qkv.stride(0), cos.stride(0),
                            row_stride, head_stride, position_stride, num_heads, num_kv_heads, head_dim,
                            head_dim // 2, HALF_BLOCK=triton.next_power_of_2(head_dim // 2))


def rotary_kv_reference(qkv: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                        num_kv_heads: int) -> None:
    """The same with torch's operators, as LlamaAttention and arena_attention do it."""
    head_dim = k_cache.shape[-1]
    tokens = qkv.shape[0]
    q, k, v = qkv.view(tokens, -1, head_dim).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    angles = cos[positions][:, None], sin[positions][:, None]  # (tokens, 1, hd)
    q.copy_(apply_rope(q, *angles))
    k.copy_(apply_rope(k, *angles))
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v
