"""Tensor parallelism on CPU with gloo and 2 ranks: same tokens as one rank, and a lost rank fails clearly."""

import queue
import signal

import pytest
import torch

from flover_backend import Engine, EngineConfig, EngineDeadError, SamplingParams
from flover_backend.execution.workers import rank_device

JOBS = [(prompt, SamplingParams(max_tokens=5 + 4 * i, ignore_eos=True))
        for i, prompt in enumerate(["The quick brown fox", "Once upon a time", "a", "hello hello hello"])]


def config(**overrides) -> EngineConfig:
    return EngineConfig(**{"model": "builtin:tiny", "max_num_seqs": 3, "max_model_len": 96, "num_threads": 1,
                           **overrides})


def run_jobs(engine: Engine) -> list[list[int]]:
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    ids = [engine.add_request(prompt, params, on_output=outputs.put) for prompt, params in JOBS]
    tokens: dict[str, list[int]] = {req_id: [] for req_id in ids}
    for _ in range(sum(p.max_tokens for _, p in JOBS)):
        output = outputs.get(timeout=120)
        tokens[output.req_id].extend(output.new_token_ids)
    return [tokens[req_id] for req_id in ids]


def test_two_ranks_give_the_same_greedy_tokens_as_one():
    with Engine(config()) as engine:
        single = run_jobs(engine)
    with Engine(config(tensor_parallel_size=2)) as engine:
        assert engine.runner.model.config.num_kv_heads == 1  # tiny has 2 KV heads: one per rank
        assert engine.runner.arena.num_kv_heads == 1
        split = run_jobs(engine)
    assert split == single


def test_tensor_parallel_size_must_divide_heads():
    with pytest.raises(ValueError, match="does not divide"):
        Engine(config(tensor_parallel_size=3))


def test_lost_worker_fails_in_flight_requests_and_refuses_new_ones():
    engine = Engine(config(tensor_parallel_size=2)).start()
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    engine.add_request("doomed", SamplingParams(max_tokens=80, ignore_eos=True), on_output=outputs.put)
    first = outputs.get(timeout=60)
    assert not first.finished
    engine.runner.workers.workers[0].send_signal(signal.SIGKILL)
    final = first
    while not final.finished:
        final = outputs.get(timeout=60)
    assert final.finish_reason == "error" and "rank 1" in final.error
    with pytest.raises(EngineDeadError):
        engine.add_request("late", on_output=outputs.put)
    engine.stop()


def test_ranks_take_consecutive_gpus():
    assert [rank_device("cuda", rank) for rank in (0, 1)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert rank_device("cuda:2", 1) == torch.device("cuda", 3)
    assert rank_device("cpu", 3) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="asserts the error of a machine short of GPUs")
def test_missing_gpus_fail_before_loading_naming_the_settings():
    with pytest.raises(ValueError, match=r"device cuda:0 with tensor_parallel_size 2 needs GPUs 0\.\.1"):
        Engine(config(device="cuda", tensor_parallel_size=2))
