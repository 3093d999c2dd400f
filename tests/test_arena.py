"""The arena's invariant under any sequence of admissions, growth, finishes and compactions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_backend.execution.kv_arena import KVArena
from flover_backend.execution.row_table import RowMove, RowTable

NUM_ROWS, MAX_LEN = 6, 12

operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(1, 4)),
        st.tuples(st.just("grow"), st.integers(0, NUM_ROWS - 1)),
        st.tuples(st.just("finish"), st.integers(0, NUM_ROWS - 1)),
        st.tuples(st.just("compact"), st.just(0)),
    ),
    max_size=40,
)


def fill(arena: KVArena, row: int, start: int, stop: int, value: float) -> None:
    arena.used_span(row, stop)[..., start:, :] = value


@settings(max_examples=150, deadline=None)
@given(operations, st.booleans(), st.booleans(), st.integers(0, 2))
def test_held_rows_keep_their_kv_unchanged_and_compaction_keeps_live_rows_dense(ops, compaction, position_major,
                                                                                 max_retained):
    """Live rows and retained ones (a finish with an odd argument retains its row) keep their keys through any
    admissions (which may take a retained row), growth and compactions, copied by torch (the CPU's copy, and the
    one a GPU falls back to where CuPy cannot compile its kernels)."""
    arena = KVArena(num_layers=2, max_num_seqs=NUM_ROWS, num_kv_heads=2, max_model_len=MAX_LEN,
                    head_dim=3, dtype=torch.float32, device=torch.device("cpu"), position_major=position_major)
    table = RowTable(NUM_ROWS, compaction=compaction, max_retained=max_retained)
    reference: dict[str, torch.Tensor] = {}  # req_id -> its KV positions [:length], live or retained
    row_of: dict[str, int] = {}  # live rows only
    next_id = 0
    for op, arg in ops:
        if op == "admit" and table.num_available:
            req_id, next_id = f"r{next_id}", next_id + 1
            row = row_of[req_id] = table.allocate(req_id)
            fill(arena, row, 0, arg, float(next_id))
            reference[req_id] = arena.used_span(row, arg).clone()
        elif op in ("grow", "finish") and row_of:
            req_id = sorted(row_of)[arg % len(row_of)]
            row = row_of[req_id]
            if op == "finish":
                del row_of[req_id]
                kept = table.retain(row) if arg % 2 else table.release(row)  # retain frees what it does not keep
                if not kept:
                    fill(arena, row, 0, MAX_LEN, float("nan"))  # a freed row's contents are garbage
            elif reference[req_id].shape[-2] < MAX_LEN:
                length = reference[req_id].shape[-2]
                fill(arena, row, length, length + 1, 1000.0 + length)
                reference[req_id] = arena.used_span(row, length + 1).clone()
        elif op == "compact":
            moves = table.plan_compaction({req_id: ref.shape[-2] for req_id, ref in reference.items()})
            copied = arena.apply_moves(moves)
            assert copied == sum(m.length for m in moves) * arena.bytes_per_position  # used positions only
            for move in moves:
                if table.is_live(move.dst):
                    row_of[table.owner(move.dst)] = move.dst
            if compaction:
                assert sorted(row_of.values()) == list(range(len(row_of)))
            else:
                assert moves == []
        retained = table.retained
        assert len(retained) <= max_retained and not set(retained) & set(row_of)
        reference = {req_id: ref for req_id, ref in reference.items() if req_id in row_of or req_id in retained}
        for req_id, row in row_of.items() | retained.items():
            assert table.owner(row) == req_id
            torch.testing.assert_close(arena.used_span(row, reference[req_id].shape[-2]), reference[req_id])


@pytest.mark.parametrize("position_major", [False, True])
def test_torch_view_shares_memory_with_numpy_storage(position_major):
    arena = KVArena(1, 2, 1, 4, 2, torch.float32, torch.device("cpu"), position_major=position_major)
    arena.tensor[0, 1, 1] = 5.0
    assert np.all(arena.array[0, 1, 1] == 5.0)


def test_a_position_major_row_holds_its_first_positions_of_every_head_in_one_span():
    """What the native kernel streams: positions [0, n) of a row, all kv heads, are contiguous memory."""
    arena = KVArena(2, 3, 4, 10, 8, torch.float32, torch.device("cpu"), position_major=True)
    assert arena.tensor.shape == (2, 2, 3, 4, 10, 8)
    assert arena.layer(1)[0][2].transpose(0, 1)[:6].is_contiguous()
    assert not KVArena(2, 3, 4, 10, 8, torch.float32, torch.device("cpu")).layer(1)[0][2].transpose(0, 1)[
        :6].is_contiguous()


def test_bfloat16_arena_is_reinterpreted_uint16_storage():
    arena = KVArena(1, 2, 1, 4, 2, torch.bfloat16, torch.device("cpu"))
    assert arena.tensor.dtype == torch.bfloat16 and arena.array.dtype == np.uint16
    arena.tensor[0, 0, 1, 0, 0, 0] = 1.5
    arena.apply_moves([RowMove(src=1, dst=0, length=1)])
    assert arena.tensor[0, 0, 0, 0, 0, 0].item() == 1.5
