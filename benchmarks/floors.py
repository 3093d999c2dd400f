"""What this machine can do at best: memory bandwidth and matmul rate, measured, and the decode-step floor."""

from __future__ import annotations

import time

import torch

from flover_backend.execution.layers.linear import PackedLinear


def _best_of(fn, repeats: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up: page faults and kernel selection
    return min(timed() for _ in range(repeats))


def memory_bandwidth(device: torch.device, num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second a large copy moves on `device` (read + write), with torch's threads on a CPU."""
    src = torch.ones(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / _best_of(lambda: dst.copy_(src), repeats, device)


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP per second of a square matmul on `device`, the best its BLAS does (a GPU needs a bigger one to fill)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / _best_of(lambda: torch.mm(a, b), repeats, device)


def decode_floor(weight_bytes: int, num_params: int, batch_size: int, bandwidth: float, flops: float) -> float:
    """Seconds one decode step needs at least: reading every weight once, or doing its matmuls."""
    return max(weight_bytes / bandwidth, 2 * num_params * batch_size / flops)


def weight_footprint(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, parameters) a decode step reads: each tensor once, tied weights counted once, and the matrices
    that packed layers hold only in their own layouts."""
    seen, num_bytes, num_params = set(), 0, 0
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        num_bytes += param.numel() * param.element_size()
        num_params += param.numel()
    for layer in model.modules():
        if isinstance(layer, PackedLinear) and layer.weight is None:
            num_bytes += layer.weight_bytes
            num_params += layer.in_features * layer.out_features
    return num_bytes, num_params


def linear_rate(model: torch.nn.Module, rows: int, repeats: int = 5) -> float:
    """FLOP per second of the model's matmuls (every linear layer, the LM head included) on `rows` rows, each
    layer's weights read from memory as in a decode step; best of `repeats` passes over all of them."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    some = next(model.parameters())
    inputs = [torch.randn(rows, layer.in_features, device=some.device, dtype=some.dtype) for layer in layers]

    def every_layer() -> None:
        with torch.inference_mode():
            for layer, x in zip(layers, inputs):
                layer(x)

    flop = sum(2 * rows * layer.in_features * layer.out_features for layer in layers)
    return flop / _best_of(every_layer, repeats, some.device)
