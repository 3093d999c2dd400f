"""What the loop records about itself, driven step by step in-process: per-request timings, totals, the log line."""

import logging
import re

import pytest

from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.engine.stats import RecordLog

SECRET = "confidential prompt text"


def tiny_engine(**overrides) -> Engine:
    return Engine(EngineConfig(**{"model": "builtin:tiny", "max_num_seqs": 2, "max_model_len": 96, "num_threads": 1,
                                  **overrides}))


def length_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def finished_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "flover_backend.engine.engine" and r.levelno == logging.INFO and r.getMessage().startswith("finished")]


def test_a_finished_request_logs_one_line_with_its_counts_and_not_its_prompt(caplog):
    caplog.set_level(logging.INFO, logger="flover_backend")
    engine = tiny_engine()
    try:
        num_prompt_tokens = len(engine.tokenizer.encode(SECRET).ids)
        req_id = engine.add_request(SECRET, length_params(5), on_output=lambda output: None)
        engine.run_until_idle()
    finally:
        engine.stop()
    (line,) = finished_lines(caplog)
    assert line.startswith(f"finished {req_id}: finish_reason=length ")
    assert f" prompt_tokens={num_prompt_tokens} output_tokens=5 " in line
    assert re.search(r"queue_time=\d+\.\d{4}s ttft=\d+\.\d{4}s tpot=\d+\.\d{4}s e2e=\d+\.\d{4}s$", line)
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_log_prompts_adds_the_prompt_to_that_line(caplog):
    caplog.set_level(logging.INFO, logger="flover_backend")
    engine = tiny_engine(log_prompts=True)
    try:
        engine.add_request(SECRET, length_params(2), on_output=lambda output: None)
        engine.run_until_idle()
    finally:
        engine.stop()
    (line,) = finished_lines(caplog)
    assert line.endswith(f" prompt={SECRET!r}")


def test_timings_follow_the_request_through_admission_first_token_and_end():
    engine = tiny_engine(max_num_seqs=1)
    outputs = []
    try:
        first = engine.add_request("first", length_params(3), on_output=outputs.append)
        second = engine.add_request("second", length_params(4), on_output=outputs.append)
        engine.step()  # admits `first` only: one row
        running = engine.scheduler.running[first]
        waiting = engine.scheduler.waiting[0]
        assert running.queue_time >= 0 and running.time_to_first_token >= running.queue_time
        assert running.time_per_output_token is None and running.e2e_latency is None  # one token so far
        assert waiting.req_id == second and waiting.queue_time is None and waiting.time_to_first_token is None
        engine.run_until_idle()
    finally:
        engine.stop()
    total, records = engine.stats.finished.since(0)
    assert total == 2 and [r.req_id for r in records] == [first, second]
    for record, num_tokens in zip(records, (3, 4)):
        assert record.num_output_tokens == num_tokens and record.finish_reason == "length"
        assert 0 <= record.queue_time <= record.time_to_first_token <= record.e2e_latency
        assert 0 < record.time_per_output_token * (num_tokens - 1) <= record.e2e_latency - record.time_to_first_token
    assert waiting.admitted_time >= running.finished_time  # the one row was freed at a boundary, then taken


def test_totals_reasons_and_kv_use_while_running_and_after():
    engine = tiny_engine()
    reasons = {}
    try:
        jobs = [("aa", length_params(3)), ("bbbb", length_params(6)), ("cc", length_params(40))]
        ids = [engine.add_request(prompt, params, on_output=lambda o: reasons.__setitem__(o.req_id, o.finish_reason))
               for prompt, params in jobs]
        engine.step()  # two rows: the first two admitted
        running = list(engine.scheduler.running.values())
        assert engine.stats.num_running == 2 and engine.stats.num_waiting == 1
        per_position = engine.runner.arena.bytes_per_position
        assert engine.stats.kv_bytes_in_use == sum(r.num_cached_tokens for r in running) * per_position
        assert 0 < engine.stats.kv_bytes_in_use < engine.stats.kv_bytes_allocated == engine.runner.arena.nbytes
        while ids[2] not in engine.scheduler.running:
            engine.step()
        engine.abort(ids[2])
        engine.run_until_idle()
    finally:
        engine.stop()
    prompts = [engine.tokenizer.encode(prompt).ids for prompt, _ in jobs]
    assert engine.stats.num_prompt_tokens == sum(map(len, prompts))
    assert reasons == {ids[0]: "length", ids[1]: "length", ids[2]: "abort"}
    assert engine.stats.finish_reasons == {"length": 2, "stop": 0, "abort": 1, "error": 0}
    assert engine.stats.num_running == 0 and engine.stats.kv_bytes_in_use == 0
    _, records = engine.stats.finished.since(0)
    assert {r.req_id: r.num_prompt_tokens for r in records} == {i: len(p) for i, p in zip(ids, prompts)}


def test_record_log_hands_each_record_once_and_stays_bounded():
    log = RecordLog(maxlen=3)
    for i in range(2):
        log.append(i)
    seen, records = log.since(0)
    assert (seen, records) == (2, [0, 1])
    for i in range(2, 7):
        log.append(i)
    assert log.since(seen) == (7, [4, 5, 6])  # 2 and 3 fell out of the bound before anyone read them
    assert log.since(7) == (7, [])
    assert log.newest(2) == [5, 6] and list(log) == [4, 5, 6]


@pytest.mark.parametrize("level", ["debug", "error"])
def test_configure_logging_sets_the_package_level_and_one_handler(level):
    from flover_backend.frontends.triton.logs import configure_logging

    package = logging.getLogger("flover_backend")
    saved = package.handlers, package.level, package.propagate
    try:
        configure_logging(level, "flover_0")
        configure_logging(level, "flover_0")
        assert package.level == getattr(logging, level.upper()) and len(package.handlers) == 1
        assert "flover_0" in package.handlers[0].formatter._fmt
    finally:
        package.handlers, package.level, package.propagate = saved
    with pytest.raises(ValueError, match="log_level"):
        configure_logging("loud", "flover_0")
