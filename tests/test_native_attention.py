"""The compiled CPU decode-attention kernel against the batched-matmul attention it replaces."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_backend.execution.layers.attention import ForwardBatch, arena_attention
from flover_backend.native import attention as native_attention
from tests.native_kernels import built

MAX_LEN = 40


@pytest.fixture(scope="module")
def kernel() -> native_attention.DecodeAttentionKernel:
    """The kernel as the engine builds it."""
    return built(native_attention)


def arena_layer(rows: int, num_kv_heads: int, head_dim: int, seed: int,
                position_major: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values as the arena lays them out: (rows, nkv, max_len, hd) views of one
    (layers, 2, ...) buffer, stored position-major (the engine's CPU layout) or head-major."""
    shape = (2, 2, rows, MAX_LEN, num_kv_heads, head_dim) if position_major else (2, 2, rows, num_kv_heads, MAX_LEN,
                                                                                  head_dim)
    arena = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if position_major:
        arena = arena.transpose(3, 4)
    return arena[1, 0], arena[1, 1]


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(0, MAX_LEN - 2), min_size=1, max_size=5), group=st.sampled_from([1, 2, 3]),
       window=st.sampled_from([None, 1, 4, 16]), seed=st.integers(0, 2**16), position_major=st.booleans())
def test_stores_and_attends_as_the_matmul_attention_does(kernel, lens, group, window, seed, position_major):
    """The same keys stored in the same places, and the same attention (each row sees its length + 1 keys,
    within its window), with GQA and sliding windows, over either arena layout."""
    num_kv_heads, head_dim, rows = 2, 8, len(lens)
    q = random(rows, num_kv_heads * group, 1, head_dim, seed=seed + 1)
    k, v = random(rows, num_kv_heads, 1, head_dim, seed=seed + 2), random(rows, num_kv_heads, 1, head_dim, seed=seed + 3)
    outputs, caches = [], []
    for native in (False, True):
        k_cache, v_cache = arena_layer(rows, num_kv_heads, head_dim, seed, position_major)
        batch = ForwardBatch.decode(slice(0, rows), torch.tensor(lens), max(lens) + 1,
                                    kernel=kernel if native else None)
        outputs.append(arena_attention(q, k, v, k_cache, v_cache, batch, window))
        caches.append((k_cache, v_cache))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(*caches))


def test_a_row_gets_the_same_bits_alone_and_in_a_batch(kernel):
    """Each (row, head) is computed alone, so what else is in the batch never changes a row's result."""
    k_cache, v_cache = arena_layer(6, 2, 16, seed=3)
    q, k, v = random(6, 4, 1, 16, seed=4), random(6, 2, 1, 16, seed=5), random(6, 2, 1, 16, seed=6)
    write_pos, starts = torch.tensor([6, 29, 0, 11, 38, 2]), torch.tensor([0, 2, 0, 5, 0, 0])
    ends = write_pos + 1
    together = kernel(q, k, v, k_cache, v_cache, write_pos, starts, ends)
    for row in range(6):
        one = slice(row, row + 1)
        alone = kernel(q[one], k[one], v[one], k_cache[one], v_cache[one], write_pos[one], starts[one], ends[one])
        assert torch.equal(alone[0], together[row])


def test_a_row_with_no_visible_key_gets_zeros(kernel):
    k_cache, v_cache = arena_layer(2, 1, 8, seed=5)
    new = torch.ones(2, 1, 1, 8)
    out = kernel(torch.ones(2, 1, 1, 8), new, new, k_cache, v_cache, torch.tensor([3, 3]), torch.tensor([4, 0]),
                 torch.tensor([4, 4]))
    assert torch.equal(out[0], torch.zeros(1, 1, 8)) and out[1].abs().sum() > 0


def test_positions_outside_the_row_are_clamped_not_read_or_written(kernel):
    """The C kernel bounds what it is handed: a write position past the row writes nothing, and a range past
    it reads only the row's own positions."""
    k_cache, v_cache = arena_layer(1, 1, 8, seed=7)
    before = (k_cache.clone(), v_cache.clone())
    q, new = torch.ones(1, 1, 1, 8), torch.full((1, 1, 1, 8), 5.0)
    out = kernel(q, new, new, k_cache, v_cache, torch.tensor([MAX_LEN]), torch.tensor([-3]),
                 torch.tensor([MAX_LEN + 100]))
    whole_row = kernel(q, new, new, k_cache, v_cache, torch.tensor([-1]), torch.tensor([0]), torch.tensor([MAX_LEN]))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    assert torch.equal(out, whole_row)


def test_caches_whose_head_values_are_not_contiguous_are_refused(kernel):
    """The kernel reads each head's values as one run of floats: a view that breaks that is an error, not a misread."""
    k_cache, v_cache = arena_layer(1, 2, 8, seed=9)
    new = torch.ones(1, 2, 1, 8)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(torch.ones(1, 2, 1, 8), new, new, k_cache.transpose(2, 3), v_cache.transpose(2, 3),
               torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(1, MAX_LEN - 2), min_size=1, max_size=7), data=st.data(),
       group=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16), position_major=st.booleans())
def test_rows_sharing_a_prefix_copy_get_the_same_bits_as_reading_their_own(kernel, lens, data, group, seed,
                                                                            position_major):
    """Rows that hold copies of one prefix (some of them, of different lengths, from different sources) read it
    once from their group's reference: every output bit and every stored key is what reading their own gives."""
    num_kv_heads, head_dim, rows = 2, 8, len(lens)
    sources = data.draw(st.lists(st.sampled_from([None, 7, 9]), min_size=rows, max_size=rows))
    shared = [data.draw(st.integers(0, length)) for length in lens]
    k_cache, v_cache = arena_layer(rows, num_kv_heads, head_dim, seed, position_major)
    for source in {s for s in sources if s is not None}:  # each member's shared positions copied from the longest
        members = [r for r in range(rows) if sources[r] == source]
        longest = max(members, key=lambda r: shared[r])
        for r in members:
            k_cache[r, :, :shared[r]] = k_cache[longest, :, :shared[r]]
            v_cache[r, :, :shared[r]] = v_cache[longest, :, :shared[r]]
    q = random(rows, num_kv_heads * group, 1, head_dim, seed=seed + 1)
    k, v = random(rows, num_kv_heads, 1, head_dim, seed=seed + 2), random(rows, num_kv_heads, 1, head_dim, seed=seed + 3)
    write_pos = torch.tensor(lens)
    starts, ends = torch.zeros(rows, dtype=torch.long), write_pos + 1
    outputs, caches = [], []
    for groups in (None, native_attention.group_rows(sources, shared)):
        k_copy, v_copy = k_cache.clone(), v_cache.clone()
        outputs.append(kernel(q, k, v, k_copy, v_copy, write_pos, starts, ends, groups))
        caches.append((k_copy, v_copy))
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*caches))


def test_rows_are_grouped_by_the_prefix_they_copied_longest_first():
    groups = native_attention.group_rows([4, None, 4, 8, 4, 8], [10, 0, 30, 5, 20, 0])
    assert groups.order.tolist() == [2, 4, 0, 1, 3, 5]
    assert groups.starts.tolist() == [0, 3, 4, 5, 6]
    assert groups.shared.tolist() == [10, 0, 30, 0, 20, 0]  # row 3 alone in its group: reads its own
    assert native_attention.group_rows([1, None, 2], [5, 0, 5]) is None


def test_groups_that_do_not_cover_the_batch_are_refused(kernel):
    k_cache, v_cache = arena_layer(2, 1, 8, seed=5)
    new = torch.ones(2, 1, 1, 8)
    groups = native_attention.group_rows([1, 1, 2], [3, 3, 0])
    with pytest.raises(ValueError, match="cover 3 rows"):
        kernel(torch.ones(2, 1, 1, 8), new, new, k_cache, v_cache, torch.tensor([3, 3]), torch.tensor([0, 0]),
               torch.tensor([4, 4]), groups)
