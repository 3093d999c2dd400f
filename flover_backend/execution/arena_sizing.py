"""How many arena rows fit on a GPU: vLLM's `gpu_memory_utilization` for a contiguous KV arena."""

from __future__ import annotations

GRAPH_RESERVE_BYTES = 1 << 30  # CUDA graph pools, cuBLAS workspaces and the allocator's slack, beyond the rows


def row_bytes(num_layers: int, num_kv_heads: int, head_dim: int, max_model_len: int, element_size: int,
              vocab_size: int) -> int:
    """One row's device bytes: its keys and values for max_model_len positions (the arena's share), plus its
    fp32 logits twice over (the LM head's output and the sampler's working copy)."""
    kv = num_layers * 2 * num_kv_heads * max_model_len * head_dim * element_size
    return kv + 2 * 4 * vocab_size


def rows_that_fit(free_bytes: int, total_bytes: int, utilization: float, bytes_per_row: int, cap: int,
                  reserve_bytes: int = GRAPH_RESERVE_BYTES) -> int:
    """Rows the engine may allocate: what `utilization` of the device leaves after what is already in use
    (the weights, other processes) and `reserve_bytes`, at most `cap`; ValueError when not one row fits."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    in_use = total_bytes - free_bytes
    budget = utilization * total_bytes - in_use - reserve_bytes
    rows = int(budget // bytes_per_row) if budget > 0 else 0
    if rows < 1:
        raise ValueError(f"gpu_memory_utilization {utilization} leaves {max(budget, 0) / 2**30:.2f} GiB for the "
                         f"KV arena after {in_use / 2**30:.2f} GiB in use and {reserve_bytes / 2**30:.2f} GiB "
                         f"reserved; one row needs {bytes_per_row / 2**20:.1f} MiB: raise it or lower max_model_len")
    return min(rows, cap)
