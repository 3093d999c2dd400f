"""The compiled sampling kernel: its floors against a plain float64 sort, its draws against the torch pass."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_backend import SamplingParams
from flover_backend.native import sampling as native_sampling
from flover_backend.sampling.batch import BLOCK_SIZE, SamplingBatch, num_blocks
from flover_backend.sampling.sampling_pass import sample_rows
from tests.native_kernels import built

# A top-p cut is checked between the cuts at top_p -/+ this: float32 masses may round a token whose mass
# before it lands within rounding of top_p x total to either side.
TOP_P_SLACK = 1e-4


@pytest.fixture(scope="module")
def kernel() -> native_sampling.SamplingKernel:
    """The kernel as the engine builds it."""
    return built(native_sampling)


def exact_floor(row: np.ndarray, temperature: float, top_k: int, top_p: float) -> float:
    """The lowest logit a row may draw, from a float64 sort: the k-th largest, raised to the nucleus' end."""
    ranked = np.sort(row.astype(np.float64))[::-1]
    floor = ranked[top_k - 1] if top_k else -np.inf
    if top_p >= 1.0:
        return floor
    kept = ranked[ranked >= floor]
    mass = np.exp((kept - kept[0]) / temperature)
    before = np.cumsum(mass) - mass
    return max(floor, kept[(before < top_p * mass.sum()).sum() - 1])


def floors(kernel, logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float]):
    """The kernel's floor for each row of `logits` under these settings (the vocabulary padded to whole blocks
    with -inf, as the sampling pass hands it)."""
    temperature = torch.tensor(temperature, dtype=torch.float32)
    top = logits.amax(-1) / temperature
    logits = torch.nn.functional.pad(logits, (0, -logits.shape[1] % BLOCK_SIZE), value=-np.inf)
    noise = torch.zeros(len(logits), num_blocks(logits.shape[1]) + BLOCK_SIZE)
    return kernel(logits, temperature, top, torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float32), noise,
                  BLOCK_SIZE)[1]


@settings(max_examples=80, deadline=None)
@given(vocab=st.integers(1, 3000), scale=st.sampled_from([0.01, 1.0, 4.0, 60.0]),
       temperature=st.sampled_from([0.05, 0.7, 1.0, 2.5]), top_k=st.integers(0, 60),
       top_p=st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.1]), seed=st.integers(0, 2**16))
def test_floors_match_a_full_sort(kernel, vocab, scale, temperature, top_k, top_p, seed):
    """Flat and peaked rows, with ties (bfloat16-rounded logits) and tokens far past the bins' span."""
    logits = (torch.randn(2, vocab, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16().float()
    top_k = top_k if top_k < vocab else 0
    got = floors(kernel, logits, [temperature] * 2, [top_k] * 2, [top_p] * 2)
    for row, floor in zip(logits.numpy(), got.tolist()):
        if top_p >= 1.0:
            assert floor == exact_floor(row, temperature, top_k, top_p)
        else:
            lowest = exact_floor(row, temperature, top_k, min(1.0, top_p + TOP_P_SLACK))
            highest = exact_floor(row, temperature, top_k, top_p - TOP_P_SLACK)
            assert lowest <= floor <= highest


def test_rows_without_either_cut_keep_everything(kernel):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    got = floors(kernel, logits, [1.0, 0.5, 2.0], [0, 5, 0], [1.0, 1.0, 0.5])
    assert got[0] == -np.inf and got[1] == logits[1].sort(descending=True).values[4]


def test_all_tied_and_masked_tokens(kernel):
    """A row of one repeated value keeps it all; tokens at -inf (masked stops) are never the floor of a cut
    that finite tokens fill, and fill a top-k that reaches past them only at -inf."""
    tied = torch.full((1, 500), 0.25)
    assert floors(kernel, tied, [1.0], [7], [0.3]).item() == 0.25
    masked = torch.full((1, 300), -np.inf)
    masked[0, [3, 90, 250]] = torch.tensor([1.0, 2.0, 0.5])
    got = floors(kernel, masked.expand(3, -1), [1.0] * 3, [2, 0, 5], [1.0, 0.999, 1.0])
    assert got.tolist() == [1.0, 0.5, -np.inf]


def test_a_row_gets_the_same_floor_alone_and_in_a_batch(kernel):
    logits = torch.randn(8, 4000, generator=torch.Generator().manual_seed(5)) * 0.3  # a wide nucleus
    settings = ([0.8] * 8, [0, 40, 0, 0, 3, 0, 1000, 0], [0.9, 0.95, 1.0, 0.5, 0.7, 0.99, 0.9, 0.2])
    together = floors(kernel, logits, *settings)
    alone = [floors(kernel, logits[i:i + 1], *([values[i]] for values in settings)).item() for i in range(8)]
    assert together.tolist() == alone


@pytest.mark.parametrize("scale", [0.3, 3.0], ids=["flat", "peaked"])
def test_draws_the_tokens_the_torch_pass_draws(kernel, scale):
    """Same logits and noise, every kind of row together: the kernel's race picks what the torch pass picks."""
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=i) for i, (t, k, p) in enumerate(
        [(0.9, 0, 1.0), (0.8, 40, 1.0), (1.2, 0, 0.9), (0.7, 200, 0.8), (1.0, 1, 1.0), (0.5, 0, 0.3)] * 4)]
    for step in range(10):
        logits = torch.randn(len(params), 5000, generator=torch.Generator().manual_seed(step)) * scale
        generators = [torch.Generator().manual_seed(1000 * step + i) for i in range(len(params))]
        batch = SamplingBatch.build(params, generators, logits.shape[1], logits.device)
        assert torch.equal(sample_rows(logits, batch, kernel)[0], sample_rows(logits, batch)[0])


def test_a_vocabulary_of_partial_blocks_is_refused(kernel):
    logits = torch.zeros(1, 200)
    with pytest.raises(ValueError, match="whole blocks"):
        kernel(logits, torch.ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.int64), torch.ones(1),
               torch.zeros(1, 2 + BLOCK_SIZE), BLOCK_SIZE)
