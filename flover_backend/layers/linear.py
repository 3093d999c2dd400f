"""Linear layers with weights pre-packed by oneDNN for the small-batch matmuls of CPU decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Measured here (EPYC, 2 threads, fp32): oneDNN's packed weights run 1.3-2x faster than MKL's plain
# sgemm from 8 rows up, but ~1.4x slower for a single row, so small batches keep the plain path.
MIN_PACKED_ROWS = 4


class PackedLinear(nn.Module):
    """y = x W^T + b, with W also kept in oneDNN's blocked layout for batches of MIN_PACKED_ROWS or more."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.in_features = weight.shape[1]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Packed matmul for enough rows, the plain one otherwise."""
        if x.numel() // self.in_features < MIN_PACKED_ROWS:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing applies to fp32 CPU weights in builds that have it."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_linears(module: nn.Module, batch_hint: int) -> int:
    """Swap every nn.Linear under `module` for a PackedLinear, in place; returns how many were swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            # Exactly nn.Linear: subclasses (tensor parallelism's row-parallel layer) do more than the matmul.
            if type(child) is nn.Linear and can_pack(child.weight):
                setattr(parent, name, PackedLinear(child.weight, child.bias, batch_hint))
                swapped += 1
    return swapped
