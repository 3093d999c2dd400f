"""The CPU element-wise kernels of a Llama layer (elementwise.c): RMSNorm with the residual add, rotary in place,
SiLU(gate) * up, each one call where torch runs several operators. Built and loaded like the attention kernel;
where no C compiler works, `load()` says so in the log and the layers use torch's operators."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from flover_backend.native.build import declare, load_library

SOURCE = Path(__file__).with_name("elementwise.c")
_INT64, _FLOAT, _POINTER = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: float32 on the CPU, each row's floats contiguous."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)


class ElementwiseKernels:
    """The built kernels; every input is float32 on the CPU, checked by the caller with `applies`."""

    def __init__(self, library: ctypes.CDLL):
        self._rms_norm = declare(library.flover_rms_norm, [_POINTER, _POINTER, _FLOAT, _INT64, _INT64, _POINTER])
        self._add_rms_norm = declare(library.flover_add_rms_norm,
                                     [_POINTER, _POINTER, _POINTER, _FLOAT, _INT64, _INT64, _POINTER])
        self._rope = declare(library.flover_rope, [_POINTER, _INT64, _INT64, _INT64, _INT64, _POINTER, _POINTER])
        self._silu_mul = declare(library.flover_silu_mul, [_POINTER, _INT64, _INT64, _POINTER])

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm(x) * weight over the last dimension."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), eps, x.numel() // x.shape[-1], x.shape[-1],
                       out.data_ptr())
        return out

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm(x + delta) * weight); `x` is updated in place when contiguous."""
        x, delta = x.contiguous(), delta.contiguous()
        out = torch.empty_like(x)
        self._add_rms_norm(x.data_ptr(), delta.data_ptr(), weight.contiguous().data_ptr(), eps,
                           x.numel() // x.shape[-1], x.shape[-1], out.data_ptr())
        return x, out

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate, in place, the first `heads` heads of every token row of `x` (tokens, >= heads * head_dim,
        rows contiguous inside); cos and sin are each token's (tokens, head_dim) angles."""
        tokens = x.shape[0]
        if x.stride(-1) != 1 or x.shape[-1] < heads * head_dim:
            raise ValueError(f"rotary needs token rows of at least {heads * head_dim} contiguous floats")
        cos, sin = cos.reshape(tokens, head_dim).contiguous(), sin.reshape(tokens, head_dim).contiguous()
        self._rope(x.data_ptr(), tokens, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr())

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up, where the last dimension of `gate_up` is gate then up."""
        gate_up = gate_up.contiguous()
        width = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], width)
        self._silu_mul(gate_up.data_ptr(), gate_up.numel() // gate_up.shape[-1], width, out.data_ptr())
        return out


@functools.cache
def load(build_dir: Path) -> ElementwiseKernels | None:
    """The kernels, built into `build_dir` on first use; None (logged once) where they cannot be built or loaded."""
    library = load_library(SOURCE, build_dir)
    return None if library is None else ElementwiseKernels(library)
