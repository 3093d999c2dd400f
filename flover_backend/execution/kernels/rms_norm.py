"""RMSNorm fused with the residual add: one pass over each row where torch runs an add, a float32 mean and a scale."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, width, x_stride, delta_stride, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        # The sum is rounded to the model's dtype before it is normed, as torch's `x + delta` is.
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * delta_stride + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * width + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    normed = x32 * tl.rsqrt(tl.sum(x32 * x32, axis=0) / width + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Llama rounds the normed row to the model's dtype, then scales it (see RMSNorm.forward).
    out = normed.to(out_ptr.dtype.element_ty).to(tl.float32) * weight
    tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * weight) over the last dimension; without `delta`, (x, RMSNorm(x) * weight)."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    deltas = rows if delta is None else delta.reshape(-1, width)
    if rows.stride(-1) != 1 or deltas.stride(-1) != 1:
        raise ValueError("add_rms_norm needs rows whose elements are contiguous")
    total = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(rows.shape[0],)](rows, deltas, weight, total, out, width, rows.stride(0), deltas.stride(0),
                                           eps, HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(width))
    return total, out


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as Llama's RMSNorm.add_forward computes it with torch's operators."""
    if delta is not None:
        x = x + delta
    x32 = x.float()
    return x, weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
