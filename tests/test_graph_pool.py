"""Graphs sharing one memory pool (the GPU's decode and prefill graphs), run on this CPU with a fake recorder.

The fake pool is the worst case PyTorch's shared pools allow: every graph's static output lies at the start of
one buffer that every replay also uses as scratch. Served tokens must still equal each request served alone.
"""

import dataclasses
import random

import torch

from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.execution.decode_graphs import KEY_BLOCK, CapturedGraph, DecodeGraphs
from flover_backend.execution.prefill_graphs import PrefillGraphs


class FakePool:
    """One buffer shared by every graph recorded into it."""

    def __init__(self, numel: int = 1 << 16):
        self.buffer = torch.zeros(numel)


class FakeGraph:
    """Replays `forward`: scribbles over the whole pool (its scratch), then writes the result at the output."""

    def __init__(self, forward, pool: FakePool, output: torch.Tensor):
        self.forward, self.pool, self.output = forward, pool, output

    def replay(self) -> None:
        result = self.forward()
        self.pool.buffer.normal_()
        self.output.copy_(result)


def fake_recorder(pool: FakePool, log: list):
    """A recorder that places each graph's output at the start of `pool` and logs what it captured, in order."""

    def record(forward, _pool_handle) -> CapturedGraph:
        shape = forward().shape
        output = pool.buffer[:shape.numel()].view(shape)
        log.append(tuple(shape))
        return CapturedGraph(FakeGraph(forward, pool, output), output)

    return record


def test_a_replay_leaves_what_an_earlier_replay_returned():
    pool = FakePool(8)
    first = CapturedGraph(FakeGraph(lambda: torch.arange(4.0), pool, pool.buffer[:4]), pool.buffer[:4])
    second = CapturedGraph(FakeGraph(lambda: -torch.ones(4), pool, pool.buffer[:4]), pool.buffer[:4])
    held = first.replay()
    second.replay()
    assert torch.equal(held, torch.arange(4.0))
    assert torch.equal(first.replay(slice(1, 3)), torch.tensor([1.0, 2.0]))


def install_fake_graphs(engine: Engine, captured: list) -> None:
    """The runner's decode and prefill graphs, as the GPU builds them (decode batch sizes, then prefill widths,
    at start-up), recorded into one fake pool."""
    runner, config = engine.runner, engine.config
    record = fake_recorder(FakePool(), captured)
    runner.decode_graphs = DecodeGraphs(runner.model, runner.arena, config.max_num_seqs, config.max_model_len,
                                        runner.dtype, recorder=record)
    runner.prefill_graphs = PrefillGraphs(runner.model, runner.arena, config.max_model_len, recorder=record)
    with torch.inference_mode():
        runner.decode_graphs.capture_batch_sizes()
        runner.prefill_graphs.capture_widths(free_row=0)


def serve(config: EngineConfig, prompts: list[list[int]], params: SamplingParams, steps_between: int,
          captured: list | None = None) -> list[list[int]]:
    """Each prompt's tokens, a prompt joining every `steps_between` iterations while the others decode."""
    tokens: dict[str, list[int]] = {}
    engine = Engine(config)
    try:
        if captured is not None:
            install_fake_graphs(engine, captured)
        ids = []
        for prompt in prompts:
            ids.append(engine.add_request(prompt_token_ids=prompt, params=params,
                                          on_output=lambda o: tokens.setdefault(o.req_id, []).extend(o.new_token_ids)))
            for _ in range(steps_between):
                engine.step()
        engine.run_until_idle()
        if captured is not None:
            assert engine.runner.decode_graphs.capture and engine.runner.prefill_graphs.capture
            assert engine.runner.prefill_graphs.num_replays > 0
    finally:
        engine.stop()
    return [tokens[req_id] for req_id in ids]


def test_decode_states_survive_prefill_replays_of_the_same_pool():
    """Rows crossing the first key bucket (a decode shape captured under load, after the prefill widths) while
    prompts replay prefill graphs in the same iterations: the issue's GPU failure, with a pool that fails hard."""
    max_model_len = KEY_BLOCK + 64
    rng = random.Random(5)
    lengths = [1, KEY_BLOCK - 20, 37, KEY_BLOCK - 3, 120, 9]  # two contexts pass KEY_BLOCK while others join
    prompts = [[rng.randrange(3, 32000) for _ in range(n)] for n in lengths]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    config = EngineConfig(model="builtin:tiny", max_num_seqs=4, max_model_len=max_model_len, num_threads=1)
    alone = serve(dataclasses.replace(config, policy="solo"), prompts, params, steps_between=0)
    assert len({tuple(t) for t in alone}) == len(prompts)  # the prompts matter: a test that could fail
    captured: list = []
    graphed = serve(config, prompts, params, steps_between=3, captured=captured)
    # The decode shape of the second key bucket was captured after the prefill widths, as on the GPU.
    first_prefill = next(i for i, shape in enumerate(captured) if len(shape) == 3)
    assert any(len(shape) == 2 for shape in captured[first_prefill:])
    assert graphed == alone
