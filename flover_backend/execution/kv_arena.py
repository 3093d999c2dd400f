"""The KV arena's storage: one preallocated layer-major buffer (NumPy on CPU, CuPy on GPU) seen by torch."""

from __future__ import annotations

import logging

import numpy as np
import torch

from flover_backend.execution.row_table import RowMove

logger = logging.getLogger(__name__)

# NumPy and CuPy have no bfloat16: store its bits as uint16 and let torch reinterpret them.
_STORAGE_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class KVArena:
    """`[num_layers, 2, max_num_seqs, num_kv_heads, max_model_len, head_dim]`, viewed by torch once.

    Compaction copies rows in place with the array library that owns the memory, so the torch view
    made at start-up stays valid for the life of the engine. `position_major` (CPU only) stores each row's
    positions outermost, `[..., max_model_len, num_kv_heads, head_dim]`, behind the same logical view: a row's
    visible keys are then one contiguous span for the native decode-attention kernel, which streams it
    (torch's batched matmuls would copy such strided keys, so they keep the head-major layout).
    """

    def __init__(self, num_layers: int, max_num_seqs: int, num_kv_heads: int, max_model_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, position_major: bool = False):
        shape = (num_layers, 2, max_num_seqs, num_kv_heads, max_model_len, head_dim)
        storage_dtype = _STORAGE_DTYPE[dtype]
        self.device = torch.device(device)
        if position_major and self.device.type != "cpu":
            raise ValueError("the position-major arena is for the CPU kernel only")
        cupy = _cupy() if self.device.type == "cuda" else None
        if cupy is not None:  # CuPy's pool owns the arena
            with cupy.cuda.Device(self.device.index or 0):
                self.array = cupy.zeros(shape, dtype=storage_dtype)
            view = torch.from_dlpack(self.array)
        elif self.device.type == "cuda":  # torch owns it; compaction then copies by torch indexing
            self.array = None
            view = torch.zeros(shape, dtype=dtype, device=self.device)
        else:
            order = (0, 1, 2, 4, 3, 5) if position_major else tuple(range(6))  # its own inverse
            self.array = np.zeros([shape[axis] for axis in order], dtype=storage_dtype).transpose(order)
            view = torch.from_numpy(self.array)
        self.tensor = view.view(dtype) if view.dtype != dtype else view
        self.bytes_per_position = num_layers * 2 * num_kv_heads * head_dim * self.tensor.element_size()
        self.copier = "numpy"
        if self.device.type == "cuda":
            self.copier = self._warm_up_cupy_copy() if cupy is not None else "torch"

    def _warm_up_cupy_copy(self) -> str:
        """Compile CuPy's copy kernel now, not in the first compaction under load; which copier works.

        CuPy compiles its kernels with NVRTC, which needs the CUDA headers. Where they are missing, torch's
        own indexing on the same view does the copy instead (on torch's stream, with no compiler).
        """
        import cupy

        try:
            self._copy_on_torch_stream([RowMove(0, 0, 1)])  # row 0 onto itself
            return "cupy"
        except cupy.cuda.compiler.CompileException:
            logger.exception("CuPy cannot compile its copy kernels here; compaction uses torch indexing")
            return "torch"

    @property
    def nbytes(self) -> int:
        """Size of the whole buffer."""
        return self.tensor.numel() * self.tensor.element_size()

    def apply_moves(self, moves: list[RowMove]) -> int:
        """Copy each move's used positions only (a row holds its request's length, not max_model_len); bytes copied.

        Sources are live rows past the dense prefix and destinations holes inside it, so no move reads a row
        another has written: the copies can go one after another, each as long as its own row.
        """
        if self.copier == "cupy":
            self._copy_on_torch_stream(moves)
        else:
            storage = self.tensor if self.copier == "torch" else self.array
            for move in moves:
                storage[:, :, move.dst, :, :move.length] = storage[:, :, move.src, :, :move.length]
        return sum(move.length for move in moves) * self.bytes_per_position

    def _copy_on_torch_stream(self, moves: list[RowMove]) -> None:
        """Run the CuPy copies on torch's current stream so they are ordered with the forwards around them."""
        import cupy

        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)
        with stream:
            for move in moves:
                self.array[:, :, move.dst, :, :move.length] = self.array[:, :, move.src, :, :move.length]


def _cupy():
    """CuPy, or None where it does not import: CuPy 14 needs NumPy 2, and Triton's Python stub needs NumPy 1.x
    (README, "On a GPU"), so under the stub the arena is torch's own memory."""
    try:
        import cupy
    except ImportError:
        logger.warning("CuPy does not import here (it needs NumPy >= 2); the KV arena is torch's, "
                       "compaction copies by torch indexing", exc_info=True)
        return None
    return cupy
