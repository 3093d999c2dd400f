"""Where each tensor of an HF checkpoint goes in a model built in the layout it serves in."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from flover_backend.execution.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class Placement(NamedTuple):
    """Where one checkpoint tensor goes on this tensor-parallel rank."""

    module: nn.Module
    name: str  # the parameter of `module` it fills
    rows: slice | None  # the rows of that parameter it fills; None: all of it
    split_dim: int | None  # ranks hold 1/world of the checkpoint tensor along this dimension; None: whole

    @property
    def shape(self) -> torch.Size:
        """The shape of the block it fills (this rank's share of the checkpoint tensor)."""
        param = getattr(self.module, self.name)
        return param.shape if self.rows is None else param[self.rows].shape


def checkpoint_placements(model: nn.Module) -> dict[str, Placement]:
    """Checkpoint key -> its place in `model`, for every checkpoint tensor the model's parameters are made of.

    Keys use the checkpoint's module names: a stacked module (`model.stacked_modules`) stands for each
    projection stacked in it, e.g. `layers.0.self_attn.qkv_proj.weight` for `layers.0.self_attn.q_proj.weight`,
    `...k_proj.weight` and `...v_proj.weight`. Buffers are derived, never read.
    """
    parts_of: dict[str, list[tuple[str, int]]] = {}
    for checkpoint_module, (stacked, part) in model.stacked_modules.items():
        parts_of.setdefault(stacked, []).append((checkpoint_module, part))
    placements = {}
    for module_name, module in model.named_modules():
        parent, _, leaf = module_name.rpartition(".")
        for name, _ in module.named_parameters(recurse=False):
            for checkpoint_module, part in parts_of.get(leaf, [(leaf, 0)]):
                key = ".".join(filter(None, (parent, checkpoint_module, name)))
                placements[key] = _placement(module, name, part)
    return placements


def _placement(module: nn.Module, name: str, part: int) -> Placement:
    """Parallel layers say which rows of their parameter a part fills; any other parameter is read whole."""
    if isinstance(module, (MergedColumnParallelLinear, RowParallelLinear)):
        return Placement(module, name, *module.shard(name, part))
    return Placement(module, name, None, None)
