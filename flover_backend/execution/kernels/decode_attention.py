"""Decode attention straight from the KV arena: each row reads only the positions it uses, split over keys.

Today's decode step reads every row's keys up to the padded key bucket (a multiple of 256 under CUDA graphs) and
masks the rest. Here a program handles one row, one KV head (all its query heads at once, so GQA reads the keys
once) and one split of SPLIT keys; splits past a row's last key return before reading anything, so the grid
stays fixed for a graph while the bytes read follow each row's own length. A second kernel combines the splits'
partial softmaxes (log-sum-exp), so a long row is spread over many programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flover_backend.execution.layers.attention import decode_attention as torch_decode_attention


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, ends_ptr, max_ptr, sum_ptr, acc_ptr,
                  q_row_stride, q_head_stride, cache_row_stride, cache_head_stride, cache_pos_stride,
                  group, head_dim, num_splits, scale,
                  SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_BLOCK: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    heads = tl.arange(0, GROUP_BLOCK)
    dims = tl.arange(0, HEAD_BLOCK)
    head_mask, dim_mask = heads < group, dims < head_dim
    # The partials of this (row, query head, split): m (running max), l (sum of exps), acc (weighted values).
    q_head = kv_head * group + heads
    partial = (row * tl.num_programs(1) * group + q_head) * num_splits + split
    first = tl.maximum(tl.load(starts_ptr + row).to(tl.int32), split * SPLIT)
    last = tl.minimum(tl.load(ends_ptr + row).to(tl.int32), (split + 1) * SPLIT)
    m = tl.full([GROUP_BLOCK], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_BLOCK], tl.float32)
    acc = tl.zeros([GROUP_BLOCK, HEAD_BLOCK], tl.float32)
    if first < last:  # a split past the row's keys reads nothing
        q = tl.load(q_ptr + row * q_row_stride + q_head[:, None] * q_head_stride + dims[None, :],
                    mask=head_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32) * scale
        cache = row * cache_row_stride + kv_head * cache_head_stride
        for block_start in range(first, last, BLOCK_N):
            positions = block_start + tl.arange(0, BLOCK_N)
            key_mask = positions < last
            offsets = cache + positions[:, None].to(tl.int64) * cache_pos_stride + dims[None, :]
            tile_mask = key_mask[:, None] & dim_mask[None, :]
            keys = tl.load(k_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)  # (BLOCK_N, HEAD_BLOCK)
            scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # (GROUP_BLOCK, BLOCK_N)
            scores = tl.where(key_mask[None, :], scores, float("-inf"))
            new_m = tl.maximum(m, tl.max(scores, axis=1))
            correction = tl.exp(m - new_m)
            weights = tl.exp(scores - new_m[:, None])
            values = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
            acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
            l_sum = l_sum * correction + tl.sum(weights, axis=1)
            m = new_m
    tl.store(max_ptr + partial, m, mask=head_mask)
    tl.store(sum_ptr + partial, l_sum, mask=head_mask)
    tl.store(acc_ptr + partial[:, None] * head_dim + dims[None, :], acc, mask=head_mask[:, None] & dim_mask[None, :])


@triton.jit
def _combine_kernel(max_ptr, sum_ptr, acc_ptr, out_ptr, out_row_stride, out_head_stride, num_heads, num_splits,
                    head_dim, SPLITS_BLOCK: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_BLOCK)
    dims = tl.arange(0, HEAD_BLOCK)
    split_mask, dim_mask = splits < num_splits, dims < head_dim
    partial = (row * num_heads + head) * num_splits + splits
    m = tl.load(max_ptr + partial, mask=split_mask, other=float("-inf"))
    l_sum = tl.load(sum_ptr + partial, mask=split_mask, other=0.0)
    acc = tl.load(acc_ptr + partial[:, None] * head_dim + dims[None, :], mask=split_mask[:, None] & dim_mask[None, :],
                  other=0.0)
    top = tl.max(m, axis=0)
    # Splits that read no key hold m = -inf and l = 0: weight 0 (guarded, as -inf - -inf is nan).
    weights = tl.where(l_sum > 0, tl.exp(m - top), 0.0)
    total = tl.sum(weights * l_sum, axis=0)
    out = tl.sum(weights[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * out_row_stride + head * out_head_stride + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_mask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, starts: torch.Tensor,
                     ends: torch.Tensor, num_keys: int, split: int = 256, block_n: int = 32) -> torch.Tensor:
    """One query per row against keys [starts[b], ends[b]) of arena row b: (B, num_heads, head_dim) -> same.

    `k_cache`/`v_cache` are a layer's (rows, num_kv_heads, max_model_len, head_dim) view (either layout), rows
    [0, B) used; `num_keys` bounds every `ends` (the padded key bucket: it fixes the grid, not the bytes read).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention needs k and v caches of one layout and contiguous head vectors")
    if num_heads % num_kv_heads or split % block_n:
        raise ValueError("num_heads must be a multiple of num_kv_heads and split a multiple of block_n")
    group = num_heads // num_kv_heads
    num_splits = triton.cdiv(num_keys, split)
    partial_max = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    partial_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    head_block = triton.next_power_of_2(head_dim)
    row_stride, head_stride, position_stride, _ = k_cache.stride()
    _split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, starts, ends, partial_max, partial_sum, partial_acc, q.stride(0), q.stride(1),
        row_stride, head_stride, position_stride, group, head_dim, num_splits, head_dim ** -0.5,
        SPLIT=split, BLOCK_N=block_n, GROUP_BLOCK=triton.next_power_of_2(group), HEAD_BLOCK=head_block)
    out = torch.empty_like(q)
    _combine_kernel[(batch, num_heads)](partial_max, partial_sum, partial_acc, out, out.stride(0), out.stride(1),
                                        num_heads, num_splits, head_dim,
                                        SPLITS_BLOCK=triton.next_power_of_2(num_splits), HEAD_BLOCK=head_block)
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, starts: torch.Tensor,
                               ends: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The same through the torch path the model uses today: every row reads `num_keys` keys, masked."""
    batch = q.shape[0]
    positions = torch.arange(num_keys, device=q.device)
    hidden = (positions[None, :] < starts[:, None]) | (positions[None, :] >= ends[:, None])
    key_bias = torch.zeros(batch, 1, 1, num_keys, dtype=q.dtype, device=q.device).masked_fill_(
        hidden[:, None, None, :], -torch.inf)
    out = torch_decode_attention(q[:, :, None], k_cache[:batch, :, :num_keys], v_cache[:batch, :, :num_keys], key_bias)
    return out[:, :, 0]
