"""The Triton kernels (flover_backend/execution/kernels) against their torch references, run by Triton's interpreter on CPU
tensors. Shapes stay tiny (the interpreter runs each program in NumPy) but awkward: one row, odd widths, masked
tails, grouped KV heads, both arena layouts, rows whose keys end on, before and past a split's edge.

The interpreter rounds float32 to bfloat16 by truncation where a GPU rounds to nearest, so bfloat16 results are
compared within bfloat16's tolerance; float32 ones within float32 rounding.
"""

import os
import sys

# Read when triton is imported: set later, the kernels fail to launch ("outside of the scope of a kernel").
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set: set it in the environment")
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from flover_backend.execution.kernels.decode_attention import decode_attention, decode_attention_reference
from flover_backend.execution.kernels.rms_norm import add_rms_norm, add_rms_norm_reference
from flover_backend.execution.kernels.rotary_kv import rotary_kv, rotary_kv_reference
from flover_backend.execution.kernels.silu_mul import silu_mul, silu_mul_reference
from flover_backend.execution.kv_arena import KVArena

# The interpreter itself (triton 3.6 under NumPy 1.26) warns on every scalar it reads.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-5 if got.dtype == torch.float32 else 1e-2,
                               rtol=1.3e-6 if got.dtype == torch.float32 else 1.6e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (2, 3, 64), (5, 19)], ids=["one-row-odd", "batch-pow2", "2d-odd"])
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "norm-only"])
def test_add_rms_norm(dtype, shape, with_delta):
    generator = torch.Generator().manual_seed(sum(shape))
    x, delta = (torch.randn(shape, generator=generator).to(dtype) * 3 for _ in range(2))
    weight = torch.randn(shape[-1], generator=generator).to(dtype)
    total, normed = add_rms_norm(x, delta if with_delta else None, weight, 1e-5)
    want_total, want_normed = add_rms_norm_reference(x, delta if with_delta else None, weight, 1e-5)
    close(total, want_total)
    close(normed, want_normed)
    assert normed.shape == x.shape and normed.dtype == dtype


def test_add_rms_norm_reads_strided_rows():
    """Rows of a wider buffer (a token's slice of a larger projection) are read at their stride."""
    wide = torch.randn(4, 50)
    x, weight = wide[:, :37], torch.randn(37)
    close(add_rms_norm(x, None, weight, 1e-6)[1], add_rms_norm_reference(x, None, weight, 1e-6)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((1, 2 * 19), 1024), ((3, 2, 2 * 37), 16), ((2, 2 * 64), 32)],
                         ids=["one-row-odd", "odd-tail-blocks", "exact-blocks"])
def test_silu_mul(dtype, shape, block):
    gate_up = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])) * 4).to(dtype)
    got = silu_mul(gate_up, block=block)
    close(got, silu_mul_reference(gate_up))
    assert got.shape == (*shape[:-1], shape[-1] // 2)


def arena_layer(dtype: torch.dtype, position_major: bool, rows: int = 3, num_kv_heads: int = 2,
                max_model_len: int = 20, head_dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 1's (k, v) views of a real two-layer CPU arena in the given layout."""
    arena = KVArena(2, rows, num_kv_heads, max_model_len, head_dim, dtype, torch.device("cpu"), position_major)
    return arena.layer(1)


def rope_tables(positions: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position_major", [False, True], ids=["head-major", "position-major"])
@pytest.mark.parametrize("heads,head_dim,rows,positions", [
    ((4, 2), 12, [2], [19]),  # one token at the arena's last position; half a head (6) is not a power of 2
    ((6, 2), 12, [2, 0, 1, 1, 0], [0, 7, 19, 3, 4]),  # decode rows and a prompt's tokens, GQA 3:1
    ((2, 2), 16, [0, 0, 0], [5, 6, 7]),  # no grouping, a power-of-2 head
], ids=["one-token", "gqa-mixed-rows", "mha-chunk"])
def test_rotary_kv_into_the_arena(dtype, position_major, heads, head_dim, rows, positions):
    num_heads, num_kv_heads = heads
    generator = torch.Generator().manual_seed(len(rows))
    qkv = torch.randn(len(rows), (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype)
    cos, sin = rope_tables(20, head_dim, dtype)
    rows, positions = torch.tensor(rows), torch.tensor(positions)
    got_cache = arena_layer(dtype, position_major, num_kv_heads=num_kv_heads, head_dim=head_dim)
    want_cache = arena_layer(dtype, position_major, num_kv_heads=num_kv_heads, head_dim=head_dim)
    got, want = qkv.clone(), qkv.clone()
    rotary_kv(got, positions, rows, cos, sin, *got_cache, num_heads, num_kv_heads)
    rotary_kv_reference(want, positions, rows, cos, sin, *want_cache, num_heads, num_kv_heads)
    close(got, want)
    close(got_cache[0], want_cache[0])
    close(got_cache[1], want_cache[1])
    assert not torch.equal(got, qkv)  # q and k were rotated in place
    written = got_cache[0].abs().sum(dim=(1, 3)) > 0  # (rows, positions) that hold a key now
    assert written.sum() == len(set(zip(rows.tolist(), positions.tolist())))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position_major", [False, True], ids=["head-major", "position-major"])
@pytest.mark.parametrize("heads,head_dim,starts,ends,num_keys,split,block_n", [
    ((4, 2), 12, [0], [1], 20, 8, 4),  # one row, one key: every split but the first reads nothing
    ((6, 2), 12, [0, 0, 5], [8, 17, 20], 20, 8, 4),  # ends on a split edge, past one, a sliding window's start
    ((4, 1), 16, [0, 3], [13, 13], 16, 16, 8),  # all query heads on one KV head; one split
    ((3, 3), 10, [0, 0], [20, 2], 20, 4, 4),  # no grouping; many splits for the long row
], ids=["one-row-one-key", "gqa-split-edges", "gqa-4to1-one-split", "mha-many-splits"])
def test_decode_attention_reads_only_each_rows_keys(dtype, position_major, heads, head_dim, starts, ends, num_keys,
                                                    split, block_n):
    num_heads, num_kv_heads = heads
    batch = len(starts)
    generator = torch.Generator().manual_seed(num_heads * 7 + head_dim)
    q = torch.randn(batch, num_heads, head_dim, generator=generator).to(dtype)
    k_cache, v_cache = arena_layer(dtype, position_major, rows=batch + 1, num_kv_heads=num_kv_heads,
                                   max_model_len=20, head_dim=head_dim)
    k_cache.copy_(torch.randn(k_cache.shape, generator=generator) * 2)
    v_cache.copy_(torch.randn(v_cache.shape, generator=generator))
    starts_t, ends_t = torch.tensor(starts), torch.tensor(ends)
    want = decode_attention_reference(q, k_cache, v_cache, starts_t, ends_t, num_keys)
    # Poison every position a row does not use (the padded key bucket, a window's old keys, the rows past the
    # batch): the kernel must not read them, where the masked torch path would turn them into NaN.
    for row, (start, end) in enumerate(zip(starts, ends)):
        for cache in (k_cache, v_cache):
            cache[row, :, :start] = torch.nan
            cache[row, :, end:] = torch.nan
    k_cache[batch:] = torch.nan
    got = decode_attention(q, k_cache, v_cache, starts_t, ends_t, num_keys, split=split, block_n=block_n)
    close(got, want)
    assert got.shape == q.shape and got.dtype == dtype


def test_decode_attention_rejects_mismatched_layouts():
    k_cache, _ = arena_layer(torch.float32, False)
    _, v_cache = arena_layer(torch.float32, True)
    with pytest.raises(ValueError, match="one layout"):
        decode_attention(torch.zeros(1, 2, 12), k_cache, v_cache, torch.tensor([0]), torch.tensor([1]), 20)
