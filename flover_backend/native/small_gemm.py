"""The CPU linear layer for 1-12 rows (small_gemm.c): weights packed in 32-column panels, streamed once per call.
Built and loaded like the attention kernel; where no C compiler works, `load()` says so in the log and linear
layers keep oneDNN's packed matmul at every row count."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from flover_backend.native.build import declare, load_library

SOURCE = Path(__file__).with_name("small_gemm.c")
PANEL = 32
MAX_ROWS = 12  # as in small_gemm.c
_INT64, _POINTER = ctypes.c_int64, ctypes.c_void_p


class SmallGemmKernel:
    """The built kernel: `pack` a weight once, then `linear` on up to MAX_ROWS rows."""

    def __init__(self, library: ctypes.CDLL):
        self._pack = declare(library.flover_pack_panels, [_POINTER, _INT64, _INT64, _POINTER])
        self._linear = declare(library.flover_small_linear,
                               [_POINTER, _INT64, _INT64, _POINTER, _POINTER, _INT64, _POINTER])

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A float32 (out, in) weight as panels (ceil(out / 32), in, 32), the columns past `out` zero."""
        weight = weight.detach().contiguous()
        out_features, in_features = weight.shape
        packed = weight.new_empty(-(-out_features // PANEL), in_features, PANEL)
        self._pack(weight.data_ptr(), out_features, in_features, packed.data_ptr())
        return packed

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        """x (..., in) with at most MAX_ROWS rows -> (..., out_features) = x W^T + bias."""
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        rows = flat.shape[0]
        if not 1 <= rows <= MAX_ROWS or flat.shape[1] != packed.shape[1]:
            raise ValueError(f"the small-row linear takes 1-{MAX_ROWS} rows of {packed.shape[1]}, got {tuple(flat.shape)}")
        y = flat.new_empty(rows, out_features)
        self._linear(flat.data_ptr(), rows, flat.shape[1], packed.data_ptr(),
                     None if bias is None else bias.contiguous().data_ptr(), out_features, y.data_ptr())
        return y.reshape(*x.shape[:-1], out_features)


@functools.cache
def load(build_dir: Path) -> SmallGemmKernel | None:
    """The kernel, built into `build_dir` on first use; None (logged once) where it cannot be built or loaded."""
    library = load_library(SOURCE, build_dir)
    return None if library is None else SmallGemmKernel(library)
