"""The KV arena's storage: one preallocated layer-major buffer (NumPy on CPU, CuPy on GPU) seen by torch."""

from __future__ import annotations

import logging

import numpy as np
import torch

from flover_backend.row_table import RowMove

logger = logging.getLogger(__name__)

# NumPy and CuPy have no bfloat16: store its bits as uint16 and let torch reinterpret them.
_STORAGE_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class KVArena:
    """`[num_layers, 2, max_num_seqs, num_kv_heads, max_model_len, head_dim]`, viewed by torch once.

    Compaction copies rows in place with the array library that owns the memory, so the torch view
    made at start-up stays valid for the life of the engine.
    """

    def __init__(self, num_layers: int, max_num_seqs: int, num_kv_heads: int, max_model_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_layers, 2, max_num_seqs, num_kv_heads, max_model_len, head_dim)
        storage_dtype = _STORAGE_DTYPE[dtype]
        self.device = torch.device(device)
        if self.device.type == "cuda":
            import cupy  # GPU only: CuPy's pool owns the arena

            with cupy.cuda.Device(self.device.index or 0):
                self.array = cupy.zeros(shape, dtype=storage_dtype)
            view = torch.from_dlpack(self.array)
        else:
            self.array = np.zeros(shape, dtype=storage_dtype)
            view = torch.from_numpy(self.array)
        self.tensor = view.view(dtype) if view.dtype != dtype else view
        self.bytes_per_position = num_layers * 2 * num_kv_heads * head_dim * self.tensor.element_size()
        self.copier = "numpy"
        if self.device.type == "cuda":
            self.copier = self._warm_up_cupy_copy()

    def _warm_up_cupy_copy(self) -> str:
        """Compile CuPy's gather and scatter now, not in the first compaction under load; which copier works.

        CuPy compiles its kernels with NVRTC, which needs the CUDA headers. Where they are missing, torch's
        own indexing on the same view does the copy instead (on torch's stream, with no compiler).
        """
        import cupy

        try:
            self._copy_on_torch_stream([0], [0], 1)  # row 0 onto itself: the read copies before the write
            return "cupy"
        except cupy.cuda.compiler.CompileException:
            logger.exception("CuPy cannot compile its copy kernels here; compaction uses torch indexing")
            return "torch"

    @property
    def nbytes(self) -> int:
        """Size of the whole buffer."""
        return self.tensor.numel() * self.tensor.element_size()

    def apply_moves(self, moves: list[RowMove]) -> int:
        """Copy each move's used positions, all moves in one batched copy; returns bytes copied."""
        if not moves:
            return 0
        length = max(move.length for move in moves)
        src = [move.src for move in moves]
        dst = [move.dst for move in moves]
        if self.copier == "cupy":
            self._copy_on_torch_stream(src, dst, length)
        elif self.copier == "torch":
            src_rows, dst_rows = (torch.tensor(rows, device=self.device) for rows in (src, dst))
            self.tensor[:, :, dst_rows, :, :length] = self.tensor[:, :, src_rows, :, :length]
        else:
            # Fancy-indexed reads copy first, so the write never reads a row it has already overwritten.
            self.array[:, :, dst, :, :length] = self.array[:, :, src, :, :length]
        return len(moves) * length * self.bytes_per_position

    def _copy_on_torch_stream(self, src: list[int], dst: list[int], length: int) -> None:
        """Run the CuPy copy on torch's current stream so it is ordered with the forwards around it."""
        import cupy

        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)
        with stream:
            self.array[:, :, cupy.asarray(dst), :, :length] = self.array[:, :, cupy.asarray(src), :, :length]
