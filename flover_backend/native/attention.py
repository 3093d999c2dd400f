"""The CPU decode-attention kernel (decode_attention.c): built once per machine with the C compiler, called via ctypes.

torch's batched matmul runs a decode step's attention as one tiny matrix-vector product per (row, head), and
on this 2-core EPYC reads the cache at ~11 GB/s; the kernel reads each row's visible positions once, in
place, at ~29 GB/s over the position-major arena the engine gives it (32 rows x 76 positions). Where no C
compiler works, `load()` says so in the log and attention stays on the batched matmuls.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from flover_backend.native.build import declare, load_library

SOURCE = Path(__file__).with_name("decode_attention.c")
_INT64, _FLOAT, _POINTER = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


@dataclass(frozen=True)
class SharedPrefixGroups:
    """Decode rows grouped by the prefix copy they hold, for the kernel to read each shared prefix once.

    `order` lists every row of the batch once, group by group, each group's reference (the member holding
    the most shared positions) first; group g is order[starts[g]:starts[g + 1]]. Row r's positions
    [0, shared[r]) are bit-for-bit copies of its reference's. Build with `group_rows`.
    """

    order: torch.Tensor  # (B,) int64
    starts: torch.Tensor  # (G + 1,) int64
    shared: torch.Tensor  # (B,) int64, indexed by row


def group_rows(sources: list[int | None], shared: list[int]) -> SharedPrefixGroups | None:
    """Groups for a batch's rows: row r's positions [0, shared[r]) are copies of the prefix `sources[r]` names
    (None: it shares none); None when no two rows share one, so the kernel takes its plain path."""
    members: dict[int, list[int]] = {}
    for row, source in enumerate(sources):
        if source is not None and shared[row] > 0:
            members.setdefault(source, []).append(row)
    groups = [sorted(rows, key=lambda r: -shared[r]) for rows in members.values() if len(rows) > 1]
    if not groups:
        return None
    grouped = {row for rows in groups for row in rows}
    groups += [[row] for row in range(len(sources)) if row not in grouped]
    order = [row for rows in groups for row in rows]
    starts = [0]
    for rows in groups:
        starts.append(starts[-1] + len(rows))
    kept = [shared[row] if row in grouped else 0 for row in range(len(sources))]
    return SharedPrefixGroups(*(torch.tensor(x, dtype=torch.int64) for x in (order, starts, kept)))


class DecodeAttentionKernel:
    """The built kernel: stores a decode step's keys and values in the arena, then attends."""

    def __init__(self, library: ctypes.CDLL):
        self._function = declare(library.flover_decode_attention,
                                 [*[_POINTER] * 6, *[_INT64] * 3, *[_POINTER] * 4, _INT64, _POINTER, _POINTER,
                                  *[_INT64] * 5, _FLOAT])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, write_pos: torch.Tensor, starts: torch.Tensor,
                 ends: torch.Tensor, groups: SharedPrefixGroups | None = None) -> torch.Tensor:
        """Store row b's new key and value k, v (B, nkv, 1, hd) at position write_pos[b] of cache rows [0, B),
        then attend with q (B, nh, 1, hd), row b seeing positions [starts[b], ends[b]); returns (B, nh, 1, hd).
        The caches are (rows, nkv, max_len, hd) float32 arena views, in either layout (each head's values
        contiguous); write_pos, starts and ends int64 (B,). With `groups`, rows that hold copies of one prefix read
        it once, from their group's reference row (same bits, fewer bytes read)."""
        batch_size, num_heads, _, head_dim = q.shape
        if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
            raise ValueError(f"the caches must share strides, with head_dim contiguous: {k_cache.stride()}")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        write_pos, starts, ends = write_pos.contiguous(), starts.contiguous(), ends.contiguous()
        out = torch.empty_like(q)
        if groups is not None and len(groups.order) != batch_size:
            raise ValueError(f"the groups cover {len(groups.order)} rows, the batch {batch_size}")
        order, group_starts, num_groups, shared = ((None, None, 0, None) if groups is None else
                                                   (groups.order.data_ptr(), groups.starts.data_ptr(),
                                                    len(groups.starts) - 1, groups.shared.data_ptr()))
        self._function(q.data_ptr(), k.data_ptr(), v.data_ptr(), write_pos.data_ptr(), k_cache.data_ptr(),
                       v_cache.data_ptr(), *k_cache.stride()[:3], starts.data_ptr(), ends.data_ptr(), order,
                       group_starts, num_groups, shared, out.data_ptr(), batch_size, num_heads, k_cache.shape[1],
                       head_dim, k_cache.shape[2], head_dim**-0.5)
        return out


@functools.cache
def load(build_dir: Path) -> DecodeAttentionKernel | None:
    """The kernel, built into `build_dir` on first use; None (logged once) where it cannot be built or loaded."""
    library = load_library(SOURCE, build_dir)
    return None if library is None else DecodeAttentionKernel(library)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel can read an arena of this device and dtype in place: float32, on the CPU."""
    return device.type == "cpu" and dtype == torch.float32
