"""Linear layers: stacked and tensor-parallel projections, and oneDNN pre-packing for small-batch CPU matmuls.

A tensor-parallel rank holds a block of each split weight. Each parallel layer says which rows of its
parameters a checkpoint tensor fills and along which dimension the ranks split that tensor (`shard`); the
loader reads only this rank's part of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flover_backend.native.small_gemm import MAX_ROWS as SMALL_GEMM_MAX_ROWS
from flover_backend.native.small_gemm import SmallGemmKernel


class MergedColumnParallelLinear(nn.Linear):
    """Several projections of the same input stacked into one matmul (q/k/v, gate/up).

    Part i is rows [sum(part_sizes[:i]), sum(part_sizes[:i + 1])) of the weight and bias; one part makes a
    column-parallel layer. `part_sizes` are this rank's output features of each projection: its block of
    whole heads (heads are contiguous) or MLP columns, so every rank stacks its own blocks.
    """

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(part_sizes), bias=bias)
        self.part_sizes = part_sizes

    def shard(self, name: str, part: int) -> tuple[slice | None, int | None]:
        """The rows of parameter `name` that checkpoint part `part` fills; ranks split that tensor by rows."""
        start = sum(self.part_sizes[:part])
        return slice(start, start + self.part_sizes[part]), 0


class RowParallelLinear(nn.Linear):
    """This rank's block of a projection's input features; across ranks the partial products are summed.

    The bias is whole on every rank (so checkpoints load the same way everywhere) and added by rank 0 only.
    With one rank it is a plain linear layer. `reduce_results=False` leaves the sum to the caller, which can
    then all-reduce several partial products at once (GPT-J's attention + MLP).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int = 0, world: int = 1,
                 reduce_results: bool = True):
        super().__init__(in_features, out_features, bias=bias)  # `in_features`: this rank's block
        self.rank, self.world = rank, world
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full projection on every rank (this rank's partial product without `reduce_results`)."""
        y = F.linear(x, self.weight, self.bias if self.rank == 0 else None)
        if self.world > 1 and self.reduce_results:
            dist.all_reduce(y)
        return y

    def shard(self, name: str, part: int) -> tuple[slice | None, int | None]:
        """All of parameter `name` (None); ranks split the checkpoint's weight by columns, its bias not."""
        return None, 1 if name == "weight" else None


# oneDNN's packed matmul takes longer for 1 or 2 rows than for 3-6: all of builtin:small's weights at 1 / 2 / 4 /
# 8 rows took 19.9 / 22.0 / 17.3 / 19.4 ms (EPYC, AVX-512, 2 threads, packed for 32 rows). Fewer rows than this
# are padded with zeros up to it; the 1-row decode step went from 23-24 to 19-21 ms.
MIN_PACKED_ROWS = 4


class PackedLinear(nn.Module):
    """y = x W^T + b, with W kept in oneDNN's blocked layout (and in the few-row kernel's panels where given one).

    Measured here (2 threads, fp32, a decode step's weights streamed from memory): oneDNN's packed matmul beats
    the plain F.linear (MKL) at every row count, 1.7x at 1 row, 3x at 2, 2x at 32 (EPYC Zen 3 and Zen 4 alike).
    The row-major W is not kept once laid out (it would be a third copy of every weight), unless `tied`: then it
    is another module's too (a tied LM head's embedding matrix) and stays there anyway.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int,
                 small_gemm: SmallGemmKernel | None = None, tied: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_bytes = weight.numel() * weight.element_size()  # what one pass reads, in either layout
        self.weight = weight if tied else None
        self.bias = bias
        with torch.no_grad():  # a recorded graph would keep the row-major weight alive
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
            self.panels = small_gemm.pack(weight) if small_gemm is not None else None
        self.small_gemm = small_gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The small-row kernel where set and the rows fit it, else the packed matmul (of at least
        MIN_PACKED_ROWS rows, see there)."""
        rows = x.numel() // x.shape[-1]
        if self.small_gemm is not None and 1 <= rows <= SMALL_GEMM_MAX_ROWS:
            return self.small_gemm.linear(x, self.panels, self.bias, self.out_features)
        if rows >= MIN_PACKED_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros(MIN_PACKED_ROWS - rows, flat.shape[-1])])
        y = torch.ops.mkldnn._linear_pointwise(padded, self.packed, self.bias, "none", [], "")
        return y[:rows].reshape(*x.shape[:-1], y.shape[-1])


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing applies to fp32 CPU weights in builds that have it."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _is_plain_matmul(layer: nn.Module) -> bool:
    """Whether `layer` computes x W^T + b and nothing more, so a PackedLinear can stand in for it."""
    if isinstance(layer, RowParallelLinear):
        return layer.world == 1  # across ranks it also all-reduces
    return isinstance(layer, nn.Linear)


def pack_linears(module: nn.Module, batch_hint: int, small_gemm: SmallGemmKernel | None = None) -> int:
    """Swap every plain linear layer under `module` for a PackedLinear (with `small_gemm` for few rows), in place;
    returns how many were swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_matmul(child) and can_pack(child.weight):
                setattr(parent, name, PackedLinear(child.weight, child.bias, batch_hint, small_gemm))
                swapped += 1
    return swapped
