"""Penalties and min_tokens: against hand-computed logits, per row only, incremental counts, the same tokens
alone or in a batch of 32, and min_tokens holding back eos, stop ids and stop strings."""

from dataclasses import replace

import pytest
import torch

from flover_backend import Engine, EngineConfig, InvalidRequestError, SamplingParams
from flover_backend.request import Request
from flover_backend.sampling.penalties import TokenCounts, apply_penalties
from flover_backend.sampling.sampler import Sampler
from tests.test_engine import drive

NEG_INF = float("-inf")


def request(prompt: list[int], output: list[int], req_id: str = "r", **params) -> Request:
    made = Request(req_id, prompt, SamplingParams(max_tokens=50, **params))
    made.output_token_ids = list(output)
    return made


def penalized(logits: list[float], prompt: list[int], output: list[int], repetition: float = 1.0,
              presence: float = 0.0, frequency: float = 0.0) -> list[float]:
    """The penalized logits, computed plainly, token by token."""
    result = []
    for token_id, value in enumerate(logits):
        if token_id in prompt or token_id in output:
            value = value / repetition if value > 0 else value * repetition
        count = output.count(token_id)
        result.append(value - frequency * count - presence * (count > 0))
    return result


def test_penalties_equal_the_hand_computation_and_leave_other_rows_alone():
    logits = [[2.0, 1.5, -0.5, 1.9, 0.3, -2.0]] * 3
    prompt, output = [0, 2], [3, 3, 4]
    settings = [{"repetition_penalty": 1.6}, {"presence_penalty": 0.4, "frequency_penalty": 0.25},
                {"repetition_penalty": 0.7, "presence_penalty": -0.5, "frequency_penalty": 1.5}]
    requests = [request(prompt, output, f"r{i}", **s) for i, s in enumerate(settings)]
    table = TokenCounts(6, torch.device("cpu"))
    slots = table.rows(requests)
    got = torch.tensor(logits)
    apply_penalties(got, table.counts[slots], table.seen[slots], requests)
    keys = {"repetition_penalty": "repetition", "presence_penalty": "presence", "frequency_penalty": "frequency"}
    for row, s in enumerate(settings):
        want = penalized(logits[row], prompt, output, **{keys[k]: v for k, v in s.items()})
        assert got[row].tolist() == pytest.approx(want, abs=1e-6)


def test_the_greedy_pick_changes_exactly_as_computed():
    """2.0 / 1.6 = 1.25 falls under 1.5: repetition turns token 0 into token 1; presence and frequency sink the
    repeated token 3 (1.9 - 2 * 0.3 - 0.2 = 1.1) under token 1 too; a row without penalties keeps token 0."""
    logits = torch.tensor([[2.0, 1.5, -0.5, 0.3], [0.4, 1.5, -0.5, 1.9], [2.0, 1.5, -0.5, 0.3]])
    requests = [request([0], [], "a", repetition_penalty=1.6),
                request([1], [3, 3], "b", presence_penalty=0.2, frequency_penalty=0.3),
                request([0], [], "c")]
    assert Sampler()(logits, requests).token_ids == [1, 1, 0]
    assert Sampler()(logits, [request([0], [], "a"), request([1], [3, 3], "b")]).token_ids == [0, 3]


def test_counts_grow_by_the_new_tokens_and_a_freed_row_starts_clean():
    table = TokenCounts(8, torch.device("cpu"))
    first = request([1, 1, 5], [], "first", frequency_penalty=1.0)
    second = request([2], [], "second", frequency_penalty=1.0)
    for token_id in [3, 3, 7, 3]:  # counted as they come: a recount would double them
        first.output_token_ids.append(token_id)
        second.output_token_ids.append(4)
        slots = table.rows([first, second])
        assert table.counts[slots[0]].tolist() == [first.output_token_ids.count(t) for t in range(8)]
    slots = table.rows([first, second])
    assert table.counts[slots[0]].tolist() == [0, 0, 0, 3, 0, 0, 0, 1]
    assert table.seen[slots[0]].nonzero()[:, 0].tolist() == [1, 3, 5, 7]
    assert table.counts[slots[1]].tolist() == [0, 0, 0, 0, 4, 0, 0, 0]
    table.release("first")
    third = request([6], [0], "third", presence_penalty=1.0)
    (slot,) = table.rows([third]).tolist()
    assert slot == slots[0].item()
    assert table.counts[slot].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert table.seen[slot].nonzero()[:, 0].tolist() == [0, 6]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).expand(2, -1).contiguous()
    sampler = Sampler(eos_token_ids=frozenset({1}))
    held = request([0], [0, 0], "held", min_tokens=3, stop_token_ids=[2])
    ignoring = request([0], [0], "ignoring", min_tokens=3, stop_token_ids=[2], ignore_eos=True)
    assert sampler(logits, [held, ignoring]).token_ids == [3, 1]  # eos (1) and stop (2) masked; eos ignored
    held.output_token_ids.append(0)
    assert sampler(logits[:1], [held]).token_ids == [1]  # min_tokens reached: eos may come


@pytest.mark.parametrize("fields, field", [
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"presence_penalty": -2.1}, "presence_penalty"), ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens"),
])
def test_out_of_range_settings_name_their_field(fields, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=16, **fields)
    assert info.value.field == field


# ----- through the engine -----

def engine_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"model": "builtin:tiny", "max_num_seqs": 32, "max_model_len": 96, "num_threads": 1,
                           **overrides})




def tokens(outputs: list) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]


def alone(prompt: str, params: SamplingParams) -> list:
    return drive(Engine(engine_config()), [(prompt, params)], steps_between=0)[0]


def test_greedy_with_penalties_follows_the_penalized_logits_step_by_step(sequence_logits):
    """After "a" the tiny model's greedy text repeats itself within 6 tokens: the penalties steer away from that."""
    engine = Engine(engine_config())
    params = SamplingParams(max_tokens=32, ignore_eos=True, repetition_penalty=1.8, presence_penalty=0.5,
                            frequency_penalty=0.7)
    (outputs,) = drive(engine, [("a", params)], steps_between=0)
    prompt = engine.tokenizer.encode("a").ids
    got = tokens(outputs)
    raw = sequence_logits(engine, prompt + got)[len(prompt) - 1:-1]
    steered = 0
    for step, token_id in enumerate(got):
        want = penalized(raw[step].tolist(), prompt, got[:step], 1.8, 0.5, 0.7)
        assert token_id == max(range(len(want)), key=want.__getitem__), step
        steered += token_id != raw[step].argmax().item()
    assert steered > 0


TARGETS = [SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.9, seed=5, repetition_penalty=1.3),
           SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.1, top_k=40, seed=6, presence_penalty=1.0,
                          frequency_penalty=0.5),
           SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=-0.5),
           SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, min_tokens=12, logprobs=3,
                          repetition_penalty=0.8)]


def test_penalized_requests_draw_the_same_alone_or_in_a_mixed_batch_of_32():
    kinds = [SamplingParams(ignore_eos=True), SamplingParams(temperature=0.8, seed=1, ignore_eos=True),
             SamplingParams(temperature=1.0, top_k=5, ignore_eos=True, frequency_penalty=2.0),
             SamplingParams(ignore_eos=True, repetition_penalty=2.0, logprobs=1),
             SamplingParams(temperature=0.6, top_p=0.7, min_tokens=2, presence_penalty=-1.0)]
    others = [(f"other {i}", replace(kinds[i % 5], max_tokens=3 + i % 9)) for i in range(28)]
    jobs = others + [(f"target {i}", params) for i, params in enumerate(TARGETS)]
    engine = Engine(engine_config())
    fused = drive(engine, jobs, steps_between=0)
    assert max(record.num_decode for record in engine.stats.iterations) == 32
    for i, (outputs, params) in enumerate(zip(fused[28:], TARGETS)):
        want = alone(f"target {i}", params)
        assert tokens(outputs) == tokens(want), params
    assert fused[-1][-1].logprobs is not None and len(tokens(fused[-1])) >= 12


def test_min_tokens_holds_back_a_stop_id_and_a_stop_string():
    engine = Engine(engine_config())
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    (base,) = drive(engine, [("abc", greedy)], steps_between=0)
    ids, text = tokens(base), "".join(o.new_text for o in base)
    stop_id = ids[2]
    first = ids.index(stop_id)  # where greedy would stop
    (stopped,) = drive(engine, [("abc", replace(greedy, ignore_eos=False, stop_token_ids=[stop_id]))], steps_between=0)
    assert tokens(stopped) == ids[:first + 1] and stopped[-1].finish_reason == "stop"
    (held,) = drive(engine, [("abc", replace(greedy, ignore_eos=False, stop_token_ids=[stop_id], min_tokens=6))], steps_between=0)
    got = tokens(held)
    assert got[:first] == ids[:first] and stop_id not in got[:6] and len(got) > 6
    assert held[-1].finish_reason == "length" or (held[-1].finish_reason == "stop" and got[-1] == stop_id)
    stop = text[4:6]
    (late,) = drive(engine, [("abc", replace(greedy, stop=[stop], min_tokens=20))], steps_between=0)
    assert tokens(late)[:20] == ids[:20] and len("".join(o.new_text for o in late)) > text.find(stop)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_penalties_min_tokens_and_logprobs_alike_on_the_gpu():
    """Counts, masks and logprobs live where the logits are: the same tokens and logprobs as on the CPU."""
    settings = [{"repetition_penalty": 1.5, "logprobs": 3}, {"temperature": 0.9, "seed": 1, "frequency_penalty": 1.0},
                {"temperature": 1.0, "top_k": 20, "seed": 2, "presence_penalty": 1.5, "min_tokens": 3,
                 "stop_token_ids": [7], "logprobs": 0}, {}]
    steps = [torch.randn(4, 1000, generator=torch.Generator().manual_seed(step)) * 3 for step in range(6)]
    results = []
    for device in ("cpu", "cuda"):
        sampler = Sampler(eos_token_ids=frozenset({5}))
        requests = [request([1, 2, 3], [], f"r{i}", **s) for i, s in enumerate(settings)]
        tokens, logprobs = [], []
        for logits in steps:
            out = sampler(logits.to(device), requests)
            tokens.append(out.token_ids)
            logprobs.append({row: (e.logprob, e.top_token_ids) for row, e in out.logprobs.items()})
            for req, token_id in zip(requests, out.token_ids):
                req.output_token_ids.append(token_id)
        results.append((tokens, logprobs))
    (cpu_tokens, cpu_logprobs), (gpu_tokens, gpu_logprobs) = results
    assert gpu_tokens == cpu_tokens
    for cpu_step, gpu_step in zip(cpu_logprobs, gpu_logprobs):
        assert gpu_step.keys() == cpu_step.keys()
        for row in cpu_step:
            assert gpu_step[row][1] == cpu_step[row][1]
            assert gpu_step[row][0] == pytest.approx(cpu_step[row][0], abs=1e-4)
