"""The compiled element-wise kernels of a Llama layer against the torch operators they replace."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_backend.execution.models.llama import RMSNorm, apply_rope
from flover_backend.native import elementwise
from tests.native_kernels import built


@pytest.fixture(scope="module")
def kernels() -> elementwise.ElementwiseKernels:
    """The kernels as the engine builds them."""
    return built(elementwise)


def random(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# Prompt-sized inputs (tokens x dim past 2**17 floats) take the kernels' OpenMP path, decode-sized ones not.
sizes = st.sampled_from([(1, 8), (3, 64), (32, 768), (300, 768)])


@settings(max_examples=20, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**16))
def test_rms_norm_and_the_residual_add_before_it_match_torch(kernels, size, seed):
    tokens, dim = size
    norm = RMSNorm(dim, eps=1e-5)
    norm.weight.data = random(dim, seed=seed)
    x, delta = random(1, tokens, dim, seed=seed + 1, scale=3.0), random(1, tokens, dim, seed=seed + 2)
    with torch.inference_mode():
        want_sum = x + delta
        want = norm(want_sum)
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, 1e-5), norm(x), rtol=1e-5, atol=1e-5)
        got_sum, got = kernels.add_rms_norm(x.clone(), delta, norm.weight, 1e-5)
    torch.testing.assert_close(got_sum, want_sum)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(tokens=st.sampled_from([1, 5, 600]), heads=st.sampled_from([(4, 4), (8, 2)]), head_dim=st.sampled_from([8, 64]),
       seed=st.integers(0, 2**16))
def test_rotary_in_place_rotates_q_and_k_heads_as_apply_rope_does_and_leaves_v(kernels, tokens, heads, head_dim, seed):
    num_heads, num_kv_heads = heads
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = random(1, tokens, width, seed=seed)
    angles = random(1, 1, tokens, head_dim, seed=seed + 1, scale=3.0)
    cos, sin = angles.cos(), angles.sin()
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    want_q = apply_rope(q.view(1, tokens, num_heads, head_dim).transpose(1, 2), cos, sin)
    want_k = apply_rope(k.view(1, tokens, num_kv_heads, head_dim).transpose(1, 2), cos, sin)
    want_v = v.clone()
    got = qkv.clone()
    kernels.rope_(got.view(tokens, width), num_heads + num_kv_heads, head_dim, cos, sin)
    got_q, got_k, got_v = got.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    torch.testing.assert_close(got_q.view(1, tokens, num_heads, head_dim).transpose(1, 2), want_q)
    torch.testing.assert_close(got_k.view(1, tokens, num_kv_heads, head_dim).transpose(1, 2), want_k)
    assert torch.equal(got_v, want_v)


def test_rotary_refuses_rows_too_short_for_its_heads(kernels):
    cos = sin = torch.ones(2, 8)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.rope_(torch.zeros(2, 16), 3, 8, cos, sin)


@settings(max_examples=20, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**16))
def test_silu_mul_matches_torch_over_the_whole_range_of_gates(kernels, size, seed):
    """Large negative and positive gates included: SiLU's exponential must neither overflow nor lose the sign."""
    tokens, width = size
    gate_up = random(1, tokens, 2 * width, seed=seed, scale=30.0)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_applies_only_to_float32_cpu_rows_that_are_contiguous():
    x = torch.zeros(4, 8)
    assert elementwise.applies(x, x[:, :4])
    assert not elementwise.applies(x.to(torch.bfloat16))
    assert not elementwise.applies(x.t())
