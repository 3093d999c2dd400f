"""The CPU decode-attention kernel (decode_attention.c): built once per machine with the C compiler, called via ctypes.

torch's batched matmul runs a decode step's attention as one tiny matrix-vector product per (row, head), and
on this 2-core EPYC reads the cache at ~11 GB/s; the kernel reads each row's visible positions once, in
place, at ~29 GB/s over the position-major arena the engine gives it (32 rows x 76 positions). Where no C
compiler works, `load()` says so in the log and attention stays on the batched matmuls.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from flover_backend.native.build import declare, load_library

SOURCE = Path(__file__).with_name("decode_attention.c")
_INT64, _FLOAT, _POINTER = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class DecodeAttentionKernel:
    """The built kernel: stores a decode step's keys and values in the arena, then attends."""

    def __init__(self, library: ctypes.CDLL):
        self._function = declare(library.flover_decode_attention,
                                 [*[_POINTER] * 6, *[_INT64] * 3, *[_POINTER] * 3, *[_INT64] * 5, _FLOAT])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, write_pos: torch.Tensor, starts: torch.Tensor,
                 ends: torch.Tensor) -> torch.Tensor:
        """Store row b's new key and value k, v (B, nkv, 1, hd) at position write_pos[b] of cache rows [0, B),
        then attend with q (B, nh, 1, hd), row b seeing positions [starts[b], ends[b]); returns (B, nh, 1, hd).
        The caches are (rows, nkv, max_len, hd) float32 arena views, in either layout (each head's values
        contiguous); write_pos, starts and ends int64 (B,)."""
        batch_size, num_heads, _, head_dim = q.shape
        if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
            raise ValueError(f"the caches must share strides, with head_dim contiguous: {k_cache.stride()}")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        write_pos, starts, ends = write_pos.contiguous(), starts.contiguous(), ends.contiguous()
        out = torch.empty_like(q)
        self._function(q.data_ptr(), k.data_ptr(), v.data_ptr(), write_pos.data_ptr(), k_cache.data_ptr(),
                       v_cache.data_ptr(), *k_cache.stride()[:3], starts.data_ptr(), ends.data_ptr(),
                       out.data_ptr(), batch_size, num_heads, k_cache.shape[1], head_dim, k_cache.shape[2],
                       head_dim**-0.5)
        return out


@functools.cache
def load(build_dir: Path) -> DecodeAttentionKernel | None:
    """The kernel, built into `build_dir` on first use; None (logged once) where it cannot be built or loaded."""
    library = load_library(SOURCE, build_dir)
    return None if library is None else DecodeAttentionKernel(library)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel can read an arena of this device and dtype in place: float32, on the CPU."""
    return device.type == "cpu" and dtype == torch.float32
