"""The engine end to end on the tiny built-in model: fused output equals alone output, and nothing is lost."""

import queue
import threading

import pytest

from flover_backend import (
    Engine,
    EngineBusyError,
    EngineConfig,
    EngineDeadError,
    InvalidRequestError,
    SamplingParams,
)
from flover_backend.execution.decode_graphs import DecodeGraphs, batch_buckets, key_bucket
from flover_backend.execution.model_runner import MAX_PREFILL_PADDING, PREFILL_ALIGN, prefill_groups
from flover_backend.execution.prefill_graphs import MAX_GRAPHED_CHUNKS, PrefillGraphs, width_buckets

PROMPTS = ["The quick brown fox", "Once upon a time", "a", "Temporal fusion merges requests at every boundary",
           "hello hello hello", "0123456789", "Zebras", "What is the capital of France?"]


def engine_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"model": "builtin:tiny", "max_num_seqs": 4, "max_model_len": 96, "num_threads": 1,
                           **overrides})


def drive(engine: Engine, jobs: list[tuple[str, SamplingParams]], steps_between: int = 1) -> list[list]:
    """Submit each job `steps_between` iterations after the last, driving `engine` on this thread until idle,
    so how requests overlap never depends on this machine's speed; each job's outputs."""
    outputs: dict = {}
    ids = []
    for prompt, params in jobs:
        ids.append(engine.add_request(prompt, params, on_output=lambda o: outputs.setdefault(o.req_id, []).append(o)))
        for _ in range(steps_between):
            engine.step()
    engine.run_until_idle()
    assert all(outputs[req_id][-1].finished for req_id in ids)
    return [outputs[req_id] for req_id in ids]


def run_staggered(config: EngineConfig, jobs: list[tuple[str, SamplingParams]], steps_between: int = 1,
                  prepare=None) -> list[list]:
    """`drive` a fresh engine (after `prepare(engine)`), stopped afterwards."""
    engine = Engine(config)
    try:
        if prepare is not None:
            prepare(engine)
        return drive(engine, jobs, steps_between)
    finally:
        engine.stop()


def token_ids(outputs: list) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]


@pytest.fixture(scope="module")
def greedy_jobs():
    return [(prompt, SamplingParams(max_tokens=6 + 5 * (i % 4), ignore_eos=True)) for i, prompt in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def alone(greedy_jobs):
    """Each job served with nothing else in the batch."""
    return run_staggered(engine_config(policy="solo"), greedy_jobs, steps_between=0)


@pytest.mark.parametrize("overrides", [{}, {"compaction": False}, {"policy": "window", "window_ms": 20},
                                       {"max_prefill_tokens": 3}, {"max_prefill_tokens": 2, "compaction": False}],
                         ids=["fused", "fused-no-compaction", "window", "chunked-prefill", "chunked-prefill-holes"])
def test_greedy_tokens_fused_equal_alone(greedy_jobs, alone, overrides):
    fused = run_staggered(engine_config(**overrides), greedy_jobs)
    for job, got, want in zip(greedy_jobs, fused, alone):
        assert token_ids(got) == token_ids(want), job[0]
        assert len(token_ids(got)) == job[1].max_tokens
        assert got[-1].finish_reason == "length"
        assert "".join(o.new_text for o in got) == "".join(o.new_text for o in want)


def static_decode(shapes: list):
    """A `prepare` that makes the runner decode through DecodeGraphs' padded shapes, as on a GPU, recording them.

    On this CPU nothing is captured: the same padded forward that a graph records runs eagerly.
    """
    def prepare(engine: Engine) -> None:
        runner, config = engine.runner, engine.config
        graphs = DecodeGraphs(runner.model, runner.arena, config.max_num_seqs, config.max_model_len,
                              runner.dtype)
        forward = graphs._forward
        graphs._forward = lambda batch, num_keys: shapes.append((batch, num_keys)) or forward(batch, num_keys)
        runner.decode_graphs = graphs
    return prepare


def static_prefill(widths: list):
    """A `prepare` that makes the runner decode through DecodeGraphs' padded shapes and write first prompt
    chunks through PrefillGraphs' padded widths, as on a GPU, recording the widths (run eagerly here)."""
    def prepare(engine: Engine) -> None:
        static_decode([])(engine)
        runner, config = engine.runner, engine.config
        graphs = PrefillGraphs(runner.model, runner.arena, config.max_prefill_tokens or config.max_model_len)
        forward = graphs._forward
        graphs._forward = lambda width: widths.append(width) or forward(width)
        runner.prefill_graphs = graphs
    return prepare


@pytest.mark.parametrize("overrides", [{}, {"compaction": False}, {"max_prefill_tokens": 3}],
                         ids=["compaction", "holes", "chunked-prefill"])
def test_padded_static_prefill_equals_alone(greedy_jobs, alone, overrides):
    widths: list = []
    fused = run_staggered(engine_config(**overrides), greedy_jobs, prepare=static_prefill(widths))
    assert [token_ids(got) for got in fused] == [token_ids(want) for want in alone]
    assert widths and set(widths) <= set(width_buckets(overrides.get("max_prefill_tokens") or 96))


def test_more_first_chunks_than_graphed_share_an_eager_forward(alone, greedy_jobs):
    """Past MAX_GRAPHED_CHUNKS first chunks in one iteration, none replays: one batched eager forward is cheaper."""
    jobs = greedy_jobs[:MAX_GRAPHED_CHUNKS + 1]
    widths: list = []
    engine = Engine(engine_config(max_num_seqs=len(jobs)))
    try:
        static_prefill(widths)(engine)
        outputs: dict = {}
        ids = [engine.add_request(prompt, params, on_output=lambda o: outputs.setdefault(o.req_id, []).append(o))
               for prompt, params in jobs]
        engine.step()
        assert widths == []
        engine.run_until_idle()
    finally:
        engine.stop()
    assert [token_ids(outputs[req_id]) for req_id in ids] == [token_ids(want) for want in alone[:len(jobs)]]


def test_width_buckets():
    assert width_buckets(96) == [16, 32, 64, 96]
    assert width_buckets(256) == [16, 32, 64, 128, 256]
    assert width_buckets(3) == [3]


@pytest.mark.parametrize("compaction", [True, False], ids=["compaction", "holes"])
def test_padded_static_decode_equals_alone(greedy_jobs, alone, compaction):
    shapes: list = []
    fused = run_staggered(engine_config(compaction=compaction), greedy_jobs, prepare=static_decode(shapes))
    assert [token_ids(got) for got in fused] == [token_ids(want) for want in alone]
    assert {batch for batch, _ in shapes} <= {1, 2, 4} and (4, 96) in shapes  # spans of 3 ran padded to 4


def test_static_decode_across_key_buckets():
    """Rows that grow past 256 keys move to the next key bucket; a short row beside them reads 512 keys too."""
    config = engine_config(max_model_len=600, max_num_seqs=3)
    long_prompt = [3 + (i * 7919) % 500 for i in range(250)]
    jobs = [(long_prompt, 12), (long_prompt[:30], 9), (long_prompt[100:], 20)]

    def run(prepare=None) -> list[list[int]]:
        with Engine(config) as engine:
            if prepare is not None:
                prepare(engine)
            streams = [engine.generate(prompt_token_ids=prompt, params=SamplingParams(max_tokens=n, ignore_eos=True))
                       for prompt, n in jobs]
            return [[t for output in stream for t in output.new_token_ids] for stream in streams]

    shapes: list = []
    assert run(static_decode(shapes)) == run()
    assert {256, 512} <= {num_keys for _, num_keys in shapes}


@pytest.mark.parametrize("graphs", [None, "decode", "prefill"], ids=["fused-forward", "graph-decode", "graph-prefill"])
@pytest.mark.parametrize("chunk_budget", [0, 40])
def test_prompts_of_very_different_lengths_prefilled_together_equal_alone(chunk_budget, graphs):
    """Prompts of very different lengths arriving together, some with decoding rows beside them, whole or in
    chunks: each gets the tokens it gets alone. Eagerly, an iteration is one forward of all its tokens end to
    end; with graph decoding, prompt chunks run in forwards of their own, each padded by at most
    MAX_PREFILL_PADDING positions; with prefill graphs too, each first chunk replays its width's graph."""
    long_prompt = [3 + (i * 7919) % 250 for i in range(80)]
    jobs = [(long_prompt, 6), (long_prompt[:5], 7), (long_prompt[10:50], 5), (long_prompt[:9], 4)]

    def run(policy: str) -> tuple[list[list[int]], list[list[int]]]:
        """Each job's tokens, and the (batch, width) of each forward of the first iteration."""
        engine = Engine(engine_config(max_prefill_tokens=chunk_budget, policy=policy))
        if graphs is not None:
            (static_prefill([]) if graphs == "prefill" else static_decode([]))(engine)
        shapes: list[list[int]] = []
        engine.runner.model.register_forward_hook(lambda _, args, out: shapes.append(list(args[0].shape)))
        outputs: dict = {}
        try:
            ids = [engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=n, ignore_eos=True),
                                      on_output=lambda o: outputs.setdefault(o.req_id, []).append(o))
                   for prompt, n in jobs]
            engine.step()
            first_step = list(shapes)
            engine.run_until_idle()
        finally:
            engine.stop()
        return [token_ids(outputs[req_id]) for req_id in ids], first_step

    fused, first_step = run("fused")
    assert run("solo")[0] == fused
    if not chunk_budget:  # all four prompts in the first iteration (80 + 5 + 40 + 9 tokens)
        # graph decoding: 80 alone, 40 with 9 (padded by 31), 5 alone; eagerly: one forward, 134 -> 136 tokens
        assert sorted(first_step) == {None: [[1, 136]], "decode": [[1, 8], [1, 80], [2, 40]],
                                      "prefill": [[1, 16], [1, 16], [1, 64], [1, 96]]}[graphs]


def test_prefill_groups_pad_each_chunk_little_and_cover_every_chunk():
    lens = [5, 80, 50, 9, 120, 44, 16, 100]
    groups = prefill_groups(lens)
    assert sorted(i for group in groups for i in group) == list(range(len(lens)))
    for group in groups:
        width = -(-lens[group[0]] // PREFILL_ALIGN) * PREFILL_ALIGN
        assert all(lens[i] <= lens[group[0]] and width - lens[i] <= MAX_PREFILL_PADDING for i in group)
    assert len(groups) < len(lens)  # chunks close in length still share a forward


def test_fused_run_really_batched_and_compacted(greedy_jobs):
    engine = Engine(engine_config())
    for prompt, params in greedy_jobs:
        engine.add_request(prompt, params, on_output=lambda o: None)
    engine.run_until_idle()
    engine.stop()
    records = list(engine.stats.iterations)
    assert max(r.num_decode for r in records) == 4  # all rows in one forward
    assert any(r.num_waiting for r in records)  # 8 requests, 4 rows: some waited
    assert engine.stats.compaction_bytes > 0
    assert all(r.decode_span == r.num_decode for r in records)  # compaction keeps the batch dense


def test_seeded_sampling_same_fused_or_alone():
    jobs = [(p, SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=100 + i, ignore_eos=True))
            for i, p in enumerate(PROMPTS[:5])]
    fused = run_staggered(engine_config(), jobs)
    solo = run_staggered(engine_config(policy="solo"), jobs, steps_between=0)
    assert [token_ids(o) for o in fused] == [token_ids(o) for o in solo]
    greedy = run_staggered(engine_config(), [(p, SamplingParams(max_tokens=10, ignore_eos=True)) for p, _ in jobs])
    assert [token_ids(o) for o in fused] != [token_ids(o) for o in greedy]  # sampling really sampled


def test_abort_frees_row_in_the_same_iteration():
    engine = Engine(engine_config(max_num_seqs=2))
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    long_params = SamplingParams(max_tokens=50, ignore_eos=True)
    victim = engine.add_request("abort me", long_params, on_output=outputs.put)
    engine.add_request("keep me", long_params, on_output=outputs.put)
    for _ in range(3):  # no loop thread: iterations are driven by hand
        engine.step()
    assert engine.scheduler.rows.num_live == 2
    engine.abort(victim)
    engine.step()
    assert engine.scheduler.rows.num_live == 1 and engine.scheduler.num_running == 1
    engine.run_until_idle()
    finals = {}
    while not outputs.empty():
        output = outputs.get()
        if output.finished:
            finals[output.req_id] = output
    assert finals[victim].finish_reason == "abort" and finals[victim].num_output_tokens == 3
    assert [o.finish_reason for o in finals.values()].count("length") == 1


def test_full_arena_queues_and_serves_everyone():
    jobs = [(f"request {i}", SamplingParams(max_tokens=5, ignore_eos=True)) for i in range(12)]
    results = run_staggered(engine_config(max_num_seqs=2), jobs, steps_between=0)
    assert [len(token_ids(o)) for o in results] == [5] * 12


def test_bad_requests_fail_clearly_and_others_go_on():
    with Engine(engine_config(max_model_len=32)) as engine:
        good = engine.generate("still fine", SamplingParams(max_tokens=5, ignore_eos=True))
        first = next(good)
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            engine.add_request("x", SamplingParams(max_tokens=40), on_output=print)
        with pytest.raises(InvalidRequestError, match="prompt"):
            engine.add_request("y" * 200, SamplingParams(max_tokens=1), on_output=print)
        with pytest.raises(InvalidRequestError, match="prompt"):
            engine.add_request("", on_output=print)
        with pytest.raises(InvalidRequestError, match="input_ids"):
            engine.add_request(prompt_token_ids=[1, 10**9], on_output=print)
        with pytest.raises(InvalidRequestError, match="top_p"):
            SamplingParams(top_p=1.5)
        rest = list(good)
    assert len(first.new_token_ids) + sum(len(o.new_token_ids) for o in rest) == 5
    assert rest[-1].finish_reason == "length"


def test_stop_string_ends_request_and_is_not_emitted():
    with Engine(engine_config()) as engine:
        full = "".join(o.new_text for o in engine.generate("abc", SamplingParams(max_tokens=30, ignore_eos=True)))
        assert len(full) > 6
        stop = full[4:6]
        outputs = list(engine.generate("abc", SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])))
    text = "".join(o.new_text for o in outputs)
    assert outputs[-1].finish_reason == "stop"
    assert text == full[: full.find(stop)]


def test_eos_finishes_with_stop_reason():
    with Engine(engine_config()) as engine:
        tokens = token_ids(list(engine.generate("abc", SamplingParams(max_tokens=4, ignore_eos=True))))
        outputs = list(engine.generate("abc", SamplingParams(max_tokens=30, stop_token_ids=[tokens[2]])))
    assert outputs[-1].finish_reason == "stop" and token_ids(outputs) == tokens[:3]


def test_stop_aborts_everything_in_flight_and_queued():
    engine = Engine(engine_config(max_num_seqs=1))
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    running = engine.add_request("never finishes", params, on_output=outputs.put)
    for _ in range(3):
        engine.step()
    waiting = engine.add_request("never starts", params, on_output=outputs.put)
    engine.stop()
    finals = {}
    while not outputs.empty():
        output = outputs.get()
        finals[output.req_id] = output
    assert finals[running].finished and finals[running].finish_reason == "abort"
    assert finals[running].num_output_tokens == 3
    assert finals[waiting].finished and finals[waiting].finish_reason == "abort"
    with pytest.raises(EngineDeadError):
        engine.add_request("late", params, on_output=outputs.put)


class SlowInbox(queue.SimpleQueue):
    """An inbox whose first `put` of a request stalls until released: add_request caught mid-way."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def put(self, item, block=True, timeout=None):
        if item[0] == "add" and not self.entered.is_set():
            self.entered.set()
            self.release.wait(timeout=30)
        super().put(item, block, timeout)


def test_request_queued_while_the_loop_shuts_down_gets_a_final_answer():
    """add_request checked the engine was running, then the loop made its last drain before the put landed."""
    engine = Engine(engine_config())
    engine._inbox = inbox = SlowInbox()
    engine.start()
    finals: queue.SimpleQueue = queue.SimpleQueue()
    adder = threading.Thread(target=engine.add_request, args=("late",),
                             kwargs={"on_output": lambda o: o.finished and finals.put(o)})
    adder.start()
    assert inbox.entered.wait(timeout=30)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    stopper.join(timeout=0.5)  # the loop would be gone by now, had add_request not held it back
    inbox.release.set()
    adder.join(timeout=30)
    stopper.join(timeout=30)
    assert finals.get(timeout=5).finish_reason == "abort"


def test_full_waiting_queue_refuses_at_once_and_accepts_again_once_admitted():
    engine = Engine(engine_config(max_num_seqs=1, max_num_waiting=2))
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for i in range(2):
        engine.add_request(f"r{i}", params, on_output=lambda o: None)
    with pytest.raises(EngineBusyError, match="busy"):
        engine.add_request("one too many", params, on_output=lambda o: None)
    engine.step()  # r0 takes the row: one place frees in the queue
    engine.add_request("now fits", params, on_output=lambda o: None)
    with pytest.raises(EngineBusyError):
        engine.add_request("full again", params, on_output=lambda o: None)
    engine.run_until_idle()
    engine.add_request("after the rush", params, on_output=lambda o: None)
    engine.stop()


def test_prompts_are_bounded_before_tokenizing():
    engine = Engine(engine_config(max_model_len=64))
    limit = engine.config.prompt_byte_limit
    assert limit == 32 * 64
    with pytest.raises(InvalidRequestError, match=f"longer than {limit} bytes"):
        engine.add_request("x" * (limit + 1), on_output=print)
    with pytest.raises(InvalidRequestError, match=f"longer than {limit} bytes"):  # 2-byte characters
        engine.add_request("é" * (limit // 2 + 1), on_output=print)
    with pytest.raises(InvalidRequestError, match="no room"):
        engine.add_request(prompt_token_ids=[5] * 10**6, on_output=print)
    engine.stop()


def test_crashed_loop_fails_requests_clearly_and_refuses_new_ones():
    engine = Engine(engine_config())
    outputs: queue.SimpleQueue = queue.SimpleQueue()

    def broken_schedule(now):
        raise RuntimeError("scheduler bug")

    engine.scheduler.schedule = broken_schedule
    engine.add_request("doomed", SamplingParams(max_tokens=5), on_output=outputs.put)
    engine.start()
    final = outputs.get(timeout=30)
    assert final.finished and final.finish_reason == "error" and "scheduler bug" in final.error
    with pytest.raises(EngineDeadError):
        engine.add_request("late", on_output=outputs.put)
    engine.stop()


def test_graph_shapes():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [key_bucket(n, 600) for n in (0, 254, 255, 256, 511, 599)] == [256, 256, 256, 512, 512, 600]


def test_a_failed_forward_ends_every_request_in_it_even_a_prompt_midway():
    """A prompt whose first chunk was lost must not go on decoding from a row that never got that chunk."""
    engine = Engine(engine_config(max_prefill_tokens=2))
    outputs: dict = {}
    long = engine.add_request("a prompt of several chunks", SamplingParams(max_tokens=4),
                              on_output=lambda o: outputs.setdefault(o.req_id, []).append(o))
    run = engine.runner.run

    def fail_once(*_):
        engine.runner.run = run
        raise RuntimeError("device lost")

    engine.runner.run = fail_once
    engine.step()
    (final,) = outputs[long]
    assert final.finished and final.finish_reason == "error" and "device lost" in final.error
    assert engine.scheduler.num_running == 0
    after = engine.add_request("next", SamplingParams(max_tokens=3, ignore_eos=True),
                               on_output=lambda o: outputs.setdefault(o.req_id, []).append(o))
    engine.run_until_idle()
    assert outputs[after][-1].finish_reason == "length"
    engine.stop()
