"""Logprobs: the chosen token's and the top alternatives' from the model's raw distribution, against a hand
computation on made-up logits and on the tiny model's own, only for the rows that ask."""

import math

import pytest
import torch

from flover_backend import Engine, EngineConfig, InvalidRequestError, SamplingParams
from flover_backend.request import Request
from flover_backend.sampling.logprobs import TokenLogprobs, vllm_logprobs
from flover_backend.sampling.sampler import Sampler

LOGITS = [2.0, 1.0, 0.5, -1.0, 3.0]


def log_softmax(values: list[float]) -> list[float]:
    total = math.log(sum(math.exp(v) for v in values))
    return [v - total for v in values]


def requests_for(params: list[SamplingParams]) -> list[Request]:
    return [Request(f"req-{i}", [1], p) for i, p in enumerate(params)]


def test_chosen_and_top_logprobs_equal_the_hand_computation():
    expected = log_softmax(LOGITS)
    logits = torch.tensor([LOGITS] * 4)
    params = [SamplingParams(logprobs=2), SamplingParams(), SamplingParams(logprobs=0, repetition_penalty=2.0),
              SamplingParams(temperature=2.0, top_k=2, seed=3, logprobs=5)]
    requests = requests_for(params)
    requests[2].prompt_token_ids = [4]  # 3.0 / 2 = 1.5 puts token 0 on top: drawn, but its logprob stays raw
    out = Sampler()(logits, requests)
    assert sorted(out.logprobs) == [0, 2, 3]  # only the rows that asked
    greedy = out.logprobs[0]
    assert (greedy.token_id, greedy.rank, greedy.top_token_ids) == (4, 1, [4, 0])
    assert greedy.logprob == pytest.approx(expected[4]) and greedy.top_logprobs == pytest.approx(
        [expected[4], expected[0]])
    penalized = out.logprobs[2]
    assert out.token_ids[2] == 0 and (penalized.rank, penalized.top_token_ids) == (2, [])
    assert penalized.logprob == pytest.approx(expected[0])
    sampled = out.logprobs[3]  # temperature and top-k change what is drawn, not the logprobs reported
    assert out.token_ids[3] in (4, 0) and sampled.logprob == pytest.approx(expected[out.token_ids[3]])
    assert sampled.top_token_ids == [4, 0, 1, 2, 3] and sampled.top_logprobs == pytest.approx(
        sorted(expected, reverse=True))


def test_rank_counts_the_tokens_at_least_as_likely():
    out = Sampler()(torch.tensor([LOGITS]), requests_for([SamplingParams(temperature=1.0, seed=0, logprobs=1)]))
    entry = out.logprobs[0]
    assert entry.rank == 1 + sum(v > LOGITS[entry.token_id] for v in LOGITS)


def test_a_row_that_fails_has_no_logprobs_and_others_keep_theirs():
    logits = torch.tensor([LOGITS, [float("nan")] * 5])
    out = Sampler()(logits, requests_for([SamplingParams(logprobs=1), SamplingParams(logprobs=1)]))
    assert list(out.errors) == [1] and list(out.logprobs) == [0]


def test_vllm_shape_puts_the_chosen_token_first_and_once():
    entries = [TokenLogprobs(7, -0.5, 1, [7, 3], [-0.5, -1.5]), TokenLogprobs(2, -4.0, 9, [5], [-0.1])]
    shaped = vllm_logprobs(entries, lambda ids: [f"<{i}>" for i in ids])
    assert shaped == [{"7": {"logprob": -0.5, "rank": 1, "decoded_token": "<7>"},
                       "3": {"logprob": -1.5, "rank": 2, "decoded_token": "<3>"}},
                      {"2": {"logprob": -4.0, "rank": 9, "decoded_token": "<2>"},
                       "5": {"logprob": -0.1, "rank": 1, "decoded_token": "<5>"}}]


@pytest.mark.parametrize("value", [-1, 21, 2.0, True])
def test_logprobs_out_of_range_names_the_field(value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logprobs=value)
    assert info.value.field == "logprobs"


def test_engine_logprobs_are_the_models_log_softmax_and_sum_up(sequence_logits):
    config = EngineConfig(model="builtin:tiny", max_num_seqs=4, max_model_len=96, num_threads=1)
    engine = Engine(config)
    outputs: list = []
    plain: list = []
    engine.add_request("Temporal fusion", SamplingParams(max_tokens=12, ignore_eos=True, logprobs=4),
                       on_output=outputs.append)
    engine.add_request("Temporal fusion", SamplingParams(max_tokens=12, ignore_eos=True), on_output=plain.append)
    engine.run_until_idle()
    assert all(o.logprobs is None and o.cumulative_logprob is None for o in plain)
    got = [t for o in outputs for t in o.new_token_ids]
    assert got == [t for o in plain for t in o.new_token_ids]
    entries = [entry for o in outputs for entry in o.logprobs]
    assert [entry.token_id for entry in entries] == got
    prompt = engine.tokenizer.encode("Temporal fusion").ids
    want = torch.log_softmax(sequence_logits(engine, prompt + got)[len(prompt) - 1:-1], dim=-1)
    for step, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(want[step, got[step]].item(), abs=1e-4)
        top = want[step].topk(4)
        assert entry.top_token_ids == top.indices.tolist() and entry.rank == 1  # greedy: the top token
        assert entry.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
    assert outputs[-1].cumulative_logprob == pytest.approx(sum(entry.logprob for entry in entries))
