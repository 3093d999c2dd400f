"""gpu_memory_utilization: arena rows sized from (made-up) free device memory, and the setting's bounds."""

from __future__ import annotations

import pytest
import torch

from flover_backend.config import EngineConfig
from flover_backend.execution.arena_sizing import GRAPH_RESERVE_BYTES, row_bytes, rows_that_fit
from flover_backend.execution.kv_arena import KVArena

GIB = 2**30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_bytes_is_the_arenas_share_per_row_plus_two_fp32_logit_rows(dtype):
    arena = KVArena(num_layers=3, max_num_seqs=4, num_kv_heads=2, max_model_len=40, head_dim=8, dtype=dtype,
                    device=torch.device("cpu"))
    per_row = row_bytes(3, 2, 8, 40, arena.tensor.element_size(), vocab_size=700)
    assert per_row == arena.nbytes // 4 + 2 * 4 * 700


def test_h200_sized_card_takes_what_its_share_leaves_after_the_weights():
    # builtin:1b-shaped rows (22 layers, 4 KV heads of 64, 2048 positions, bf16, vocab 32000) on a 141 GB card
    # whose weights and context already hold 3 GiB.
    per_row = row_bytes(22, 4, 64, 2048, 2, 32000)
    total, free = 141 * 10**9, 141 * 10**9 - 3 * GIB
    expected = int((0.9 * total - 3 * GIB - GRAPH_RESERVE_BYTES) // per_row)
    assert rows_that_fit(free, total, 0.9, per_row, cap=10**6) == expected == 2642  # 122.6 GB / 46.4 MB
    assert rows_that_fit(free, total, 0.9, per_row, cap=256) == 256  # max_num_seqs caps it
    # Another process holding 60 GiB more leaves fewer rows, never more than the share.
    assert rows_that_fit(free - 60 * GIB, total, 0.9, per_row, cap=10**6) < expected


def test_a_share_too_small_for_one_row_fails_naming_the_setting():
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.1 leaves 0.00 GiB"):
        rows_that_fit(free_bytes=10 * GIB, total_bytes=16 * GIB, utilization=0.1, bytes_per_row=GIB, cap=32)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            rows_that_fit(GIB, GIB, bad, 1, cap=1)


def test_config_bounds_the_setting():
    assert EngineConfig(gpu_memory_utilization=0.9).gpu_memory_utilization == 0.9
    assert EngineConfig.from_dict({"gpu_memory_utilization": "0.85"}).gpu_memory_utilization == 0.85
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \[0, 1\]"):
        EngineConfig(gpu_memory_utilization=1.2)
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        EngineConfig(gpu_memory_utilization=0.9, tensor_parallel_size=2)


def test_on_the_cpu_the_setting_leaves_max_num_seqs_alone(tiny_checkpoint):
    from flover_backend import Engine

    with Engine(EngineConfig(model="builtin:tiny", max_num_seqs=3, max_model_len=64,
                             gpu_memory_utilization=0.5)) as engine:
        assert engine.config.max_num_seqs == engine.runner.max_num_seqs == 3
        assert engine.stats.num_rows == 3
