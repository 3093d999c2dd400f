"""The seam between layers and kernels: a layer does its element-wise work through `self.kernels` when the
runner has installed a kernel set it takes, else through torch's operators. The runner picks the set once, at
load (the CPU's C kernels for float32 today); model families carry no hook of their own for it."""

from __future__ import annotations

from torch import nn

from flover_backend.native.elementwise import ElementwiseKernels


class UsesKernels:
    """A layer whose element-wise work (RMSNorm with its residual add, rotary, SwiGLU) a kernel set can do."""

    kernels: ElementwiseKernels | None = None  # None: torch's operators

    def takes(self, kernels: ElementwiseKernels) -> bool:
        """Whether this layer's work is what `kernels` computes (a layer with a variant they lack says no)."""
        return True


def install_kernels(model: nn.Module, kernels: ElementwiseKernels) -> int:
    """Give `kernels` to every layer of `model` that takes them; how many did (0 for a family with none)."""
    taken = [module for module in model.modules() if isinstance(module, UsesKernels) and module.takes(kernels)]
    for module in taken:
        module.kernels = kernels
    return len(taken)
