"""The small-row linear kernel (native/small_gemm.c) against torch's matmul, alone and inside PackedLinear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flover_backend.execution.layers.linear import PackedLinear, can_pack
from flover_backend.native import small_gemm
from tests.native_kernels import built


@pytest.fixture(scope="module")
def kernel() -> small_gemm.SmallGemmKernel:
    return built(small_gemm)


# 70 outputs end in a part-filled panel; 33 inputs are no multiple of a vector.
@pytest.mark.parametrize("out_features, in_features", [(70, 33), (64, 48), (32000 // 100, 768 // 4)])
@pytest.mark.parametrize("rows", range(1, small_gemm.MAX_ROWS + 1))
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_the_matmul(kernel, out_features, in_features, rows, bias):
    """Equal to torch's up to float32 rounding of sums of ~200 unit-scale products (the order of terms differs)."""
    torch.manual_seed(out_features * rows)
    weight = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    x = torch.randn(1, rows, in_features)  # (batch, tokens, features), as a decode forward has it
    got = kernel.linear(x, kernel.pack(weight), b, out_features)
    assert got.shape == (1, rows, out_features)
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_kernel_refuses_more_rows_than_it_takes(kernel):
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match=f"1-{small_gemm.MAX_ROWS} rows"):
        kernel.linear(torch.randn(small_gemm.MAX_ROWS + 1, 16), kernel.pack(weight), None, 8)


@pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this torch build has no oneDNN")
def test_packed_linear_takes_the_kernel_for_few_rows_and_onednn_beyond(kernel, monkeypatch):
    layer = nn.Linear(48, 40)
    packed = PackedLinear(layer.weight.detach(), layer.bias.detach(), batch_hint=32, small_gemm=kernel)
    calls = []
    linear = kernel.linear
    monkeypatch.setattr(kernel, "linear", lambda *args: calls.append(args[0].shape) or linear(*args))
    with torch.inference_mode():
        for rows in (1, small_gemm.MAX_ROWS, small_gemm.MAX_ROWS + 1, 2 * small_gemm.MAX_ROWS):
            x = torch.randn(1, rows, 48)
            torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    assert [shape[1] for shape in calls] == [1, small_gemm.MAX_ROWS]
