"""What this machine can do at best: memory bandwidth and matmul rate, measured, and the decode-step floor."""

from __future__ import annotations

import time

import torch


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up: page faults and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second a large copy moves (read + write), with torch's threads."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * num_bytes / _best_of(lambda: dst.copy_(src), repeats)


def matmul_rate(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP per second of a square matmul, the best the BLAS does."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _best_of(lambda: torch.mm(a, b), repeats)


def decode_floor(weight_bytes: int, num_params: int, batch_size: int, bandwidth: float, flops: float) -> float:
    """Seconds one decode step needs at least: reading every weight once, or doing its matmuls."""
    return max(weight_bytes / bandwidth, 2 * num_params * batch_size / flops)


def weight_footprint(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, parameters) a decode step reads: each tensor once, tied weights counted once."""
    seen, num_bytes, num_params = set(), 0, 0
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        num_bytes += param.numel() * param.element_size()
        num_params += param.numel()
    return num_bytes, num_params
