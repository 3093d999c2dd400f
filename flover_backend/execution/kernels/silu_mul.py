"""SwiGLU's SiLU(gate) * up in one pass over the gate-up projection's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, width, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * row_stride + width + cols, mask=mask, other=0.0).to(tl.float32)
    # Rounded twice, as torch's F.silu(gate) * up rounds each operator's result to the model's dtype.
    activated = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """SiLU(gate) * up, where the last dimension of `gate_up` is gate then up."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        raise ValueError("silu_mul needs rows whose elements are contiguous")
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    block = min(block, triton.next_power_of_2(width))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](rows, out, width, rows.stride(0), BLOCK=block)
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The same as LlamaMLP computes it with torch's operators."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
