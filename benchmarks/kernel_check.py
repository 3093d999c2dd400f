"""The Triton kernels (flover_backend/execution/kernels) against their torch references on a model's decode shapes: the
largest difference and each side's median time, side by side in one run. `gpu_check` runs it on the GPU (the
figures that decide whether wiring a kernel in pays); `--smoke` runs it under TRITON_INTERPRET=1 on tiny shapes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _median_ms(run: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of `run` in ms, the device synchronised around each call."""
    times = []
    for _ in range(repeats + 1):  # the first call compiles: not counted
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def _row(name: str, kernel: Callable, reference: Callable, device: str, repeats: int) -> dict:
    """One kernel against its reference: the largest difference of their outputs and each side's median time.
    Each callable returns its output(s); they are called on fresh copies of any input they update."""
    got, want = kernel(), reference()
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    diff = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    row = {"kernel": name, "max_abs_diff": diff, "triton_ms": _median_ms(kernel, device, repeats),
           "torch_ms": _median_ms(reference, device, repeats)}
    row["torch_over_triton"] = row["torch_ms"] / row["triton_ms"]
    print(f"{name:<34} diff {diff:9.2e}  triton {row['triton_ms']:8.3f} ms  torch {row['torch_ms']:8.3f} ms  "
          f"torch/triton {row['torch_over_triton']:5.2f}", flush=True)
    return row


def check(device: str, dtype: torch.dtype, hidden: int, intermediate: int, heads: tuple[int, int], head_dim: int,
          batches: list[int], context: int, num_keys: int, repeats: int) -> list[dict]:
    """Every kernel at each batch size (decode: one token per row, each row holding `context` keys of a
    `num_keys` bucket); one row per kernel and batch."""
    rows = []
    for batch in batches:
        rows += _rows_at(batch, device, dtype, hidden, intermediate, heads, head_dim, context, num_keys, repeats)
    return rows


def _rows_at(batch: int, device: str, dtype: torch.dtype, hidden: int, intermediate: int, heads: tuple[int, int],
             head_dim: int, context: int, num_keys: int, repeats: int) -> list[dict]:
    """`check`'s rows at one batch size."""
    from flover_backend.execution.kernels.decode_attention import decode_attention, decode_attention_reference
    from flover_backend.execution.kernels.rms_norm import add_rms_norm, add_rms_norm_reference
    from flover_backend.execution.kernels.rotary_kv import rotary_kv, rotary_kv_reference
    from flover_backend.execution.kernels.silu_mul import silu_mul, silu_mul_reference

    num_heads, num_kv_heads = heads
    generator = torch.Generator().manual_seed(batch)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    x, delta, weight, gate_up = randn(batch, hidden), randn(batch, hidden), randn(hidden), randn(batch, 2 * intermediate)
    qkv = randn(batch, (num_heads + 2 * num_kv_heads) * head_dim)
    angles = torch.arange(num_keys, dtype=torch.float32)[:, None] * torch.rand(head_dim // 2, generator=generator)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)
    positions = torch.full((batch,), context - 1, device=device)
    row_ids = torch.arange(batch, device=device)
    q = randn(batch, num_heads, head_dim)
    k_cache, v_cache = randn(batch, num_kv_heads, num_keys, head_dim), randn(batch, num_kv_heads, num_keys, head_dim)
    starts = torch.zeros(batch, dtype=torch.long, device=device)
    ends = torch.full((batch,), context, device=device)

    def rotated(rotate: Callable) -> tuple[torch.Tensor, ...]:
        updated, caches = qkv.clone(), (torch.zeros_like(k_cache), torch.zeros_like(v_cache))
        rotate(updated, positions, row_ids, cos, sin, *caches, num_heads, num_kv_heads)
        return updated, *caches

    return [
        _row(f"add_rms_norm batch {batch}", lambda: add_rms_norm(x, delta, weight, 1e-5),
             lambda: add_rms_norm_reference(x, delta, weight, 1e-5), device, repeats),
        _row(f"silu_mul batch {batch}", lambda: silu_mul(gate_up), lambda: silu_mul_reference(gate_up), device,
             repeats),
        # Both sides time a copy of qkv and two zeroed caches as well (the kernels update them in place).
        _row(f"rotary_kv batch {batch}", lambda: rotated(rotary_kv), lambda: rotated(rotary_kv_reference), device,
             repeats),
        _row(f"decode_attention batch {batch}", lambda: decode_attention(q, k_cache, v_cache, starts, ends, num_keys),
             lambda: decode_attention_reference(q, k_cache, v_cache, starts, ends, num_keys), device, repeats),
    ]


def gpu_rows() -> list[dict]:
    """builtin:1b's shapes in bfloat16 at 1 and 256 rows, 300 keys used of a 512-key bucket."""
    return check("cuda", torch.bfloat16, 2048, 5632, (32, 4), 64, [1, 256], context=300, num_keys=512, repeats=20)


def smoke_rows() -> list[dict]:
    """Tiny shapes under the interpreter (set TRITON_INTERPRET=1 before triton is first imported)."""
    return check("cpu", torch.float32, 40, 24, (4, 2), 8, [1, 3], context=9, num_keys=16, repeats=1)
