"""oneDNN-packed linear layers against the plain matmul they replace, at every row count the engine runs."""

import weakref

import pytest
import torch
from torch import nn

from flover_backend.execution.layers.linear import MIN_PACKED_ROWS, PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, MIN_PACKED_ROWS - 1), (1, MIN_PACKED_ROWS), (1, 9), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_the_plain_matmul_padded_or_not(shape, bias):
    """Fewer rows than MIN_PACKED_ROWS are padded for speed; the rows asked for come back alone, as computed plainly."""
    layer = nn.Linear(48, 40, bias=bias)
    packed = PackedLinear(layer.weight.detach(), layer.bias.detach() if bias else None, batch_hint=32)
    x = torch.randn(*shape, 48)
    with torch.inference_mode():
        got, want = packed(x), layer(x)
    assert got.shape == (*shape, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_row_gets_the_same_result_whether_padded_or_alongside_others():
    """A decode row's output may not depend on how many rows sit beside it, beyond float rounding."""
    layer = nn.Linear(64, 32)
    packed = PackedLinear(layer.weight.detach(), layer.bias.detach(), batch_hint=32)
    x = torch.randn(1, 8, 64)
    with torch.inference_mode():
        together = packed(x)
        alone = torch.cat([packed(x[:, i:i + 1]) for i in range(8)], dim=1)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


def test_pack_linears_swaps_plain_linear_layers_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    assert pack_linears(model, batch_hint=4) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert isinstance(model[1], nn.ReLU)


def test_packed_layers_drop_the_row_major_weight_unless_tied():
    """Laid out in oneDNN's blocks, a layer lets its row-major weight go (a copy of every matrix less); a tied LM
    head keeps its reference, since the embedding holds that matrix anyway."""
    model = nn.Sequential(nn.Linear(64, 32), nn.Embedding(32, 64))
    dropped = weakref.ref(model[0].weight)
    assert pack_linears(model, batch_hint=4) == 1
    assert dropped() is None
    assert model[0].weight is None and model[0].weight_bytes == 64 * 32 * 4
    head = PackedLinear(model[1].weight, None, batch_hint=4, tied=True)
    assert head.weight is model[1].weight
    with torch.inference_mode():
        x = torch.randn(3, 64)
        torch.testing.assert_close(head(x), x @ model[1].weight.T, rtol=1e-5, atol=1e-5)
