"""The KV arena: one preallocated layer-major buffer (NumPy on CPU, CuPy on GPU) seen by torch, behind named views."""

from __future__ import annotations

import logging

import numpy as np
import torch

from flover_backend.execution.row_table import RowMove

logger = logging.getLogger(__name__)

# NumPy and CuPy have no bfloat16: store its bits as uint16 and let torch reinterpret them.
_STORAGE_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class KVArena:
    """Every layer's keys and values for `max_num_seqs` rows of `max_model_len` positions, viewed by torch once.

    Callers see it through `layer(i)` (that layer's keys and values, each (rows, nkv, max_model_len, hd)),
    `used_span`, `scratch_position` and `apply_moves`; how the six dimensions lie in memory is its own business.

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
        self.num_rows, self.max_model_len, self.num_kv_heads = max_num_seqs, max_model_len, num_kv_heads
        self.position_major = position_major
        # The key slot of a row that no request writes: prompt + max_tokens <= max_model_len, and the last
        # token is never fed back, so positions stop at max_model_len - 2. Rows that a forward covers but that
        # are not decoding write their dummy key here.
        self.scratch_position = max_model_len - 1
        # Made once: a forward asks for every layer's views, and building them per call costs more than the list.
        self._layers = [(self.tensor[i, 0], self.tensor[i, 1]) for i in range(num_layers)]
        self.bytes_per_position = num_layers * 2 * num_kv_heads * head_dim * self.tensor.element_size()
        # On the CPU, torch's copy of the NumPy-owned memory: it runs on torch's threads, where NumPy's runs on one
        # (a 400-position builtin:small row, 29.5 MB: 1.6 ms against 4.5 ms on the 2-core AMD EPYC).
        self.copier = "torch"
        if self.device.type == "cuda":
            self.copier = self._warm_up_cupy_copy() if cupy is not None else "torch"

    @classmethod
    def for_model(cls, config, max_num_seqs: int, max_model_len: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", position_major: bool = False) -> KVArena:
        """An arena sized for a model's config (its `num_layers`, `num_kv_heads` and `head_dim`)."""
        return cls(config.num_layers, max_num_seqs, config.num_kv_heads, max_model_len, config.head_dim, dtype,
                   torch.device(device), position_major)

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
    def num_layers(self) -> int:
        """Layers whose keys and values it holds."""
        return len(self._layers)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (keys, values), each (rows, num_kv_heads, max_model_len, head_dim), views of the arena."""
        return self._layers[index]

    def used_span(self, row: int, length: int) -> torch.Tensor:
        """Row `row`'s first `length` positions of every layer, (num_layers, 2, num_kv_heads, length, head_dim), a view."""
        return self.tensor[:, :, row, :, :length]

    @property
    def nbytes(self) -> int:
        """Size of the whole buffer."""
        return self.tensor.numel() * self.tensor.element_size()

    def apply_moves(self, moves: list[RowMove]) -> int:
        """Copy each move's used positions only (a row holds its request's length, not max_model_len); bytes copied.

        The copies go one after another, in the list's order, each as long as its own row: a move that reads a
        row another move writes comes before it (compaction plans them so; prefix copies come after the moves).
        """
        if self.copier == "cupy":
            self._copy_on_torch_stream(moves)
        else:
            for move in moves:
                self.tensor[:, :, move.dst, :, :move.length] = self.tensor[:, :, move.src, :, :move.length]
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
    (README, "GPUs"), so under the stub the arena is torch's own memory."""
    try:
        import cupy
    except ImportError:
        logger.warning("CuPy does not import here (it needs NumPy >= 2); the KV arena is torch's, "
                       "compaction copies by torch indexing", exc_info=True)
        return None
    return cupy
