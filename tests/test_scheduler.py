"""Scheduler decisions with hand-written sampled ids and no model."""

import pytest

from flover_backend.config import EngineConfig
from flover_backend.engine.scheduler import Scheduler
from flover_backend.request import Request, RequestStatus
from flover_backend.sampling.params import SamplingParams


def make_scheduler(**overrides) -> Scheduler:
    """Prefix caching off: these prompts all share their tokens, and retained rows and copies would change which
    rows move (tests/test_prefix_cache.py covers those)."""
    return Scheduler(EngineConfig(**{"max_num_seqs": 4, "prefix_caching": False, **overrides}))


def make_request(req_id: str, prompt_len: int = 3, max_tokens: int = 4, arrival: float = 0.0, **params) -> Request:
    return Request(req_id, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, **params),
                   arrival_time=arrival)


def run_iteration(scheduler: Scheduler, now: float = 0.0, token: int = 7):
    """One boundary, then a token for everyone scheduled; those at max_tokens finish (the engine's rule)."""
    out = scheduler.schedule(now)
    for request in out.scheduled:
        request.output_token_ids.append(token)
        if request.num_output_tokens >= request.params.max_tokens:
            scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
    return out


def test_fused_admits_at_every_boundary_and_decodes_all_running_in_one_batch():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a"))
    first = run_iteration(scheduler)
    assert [c.request.req_id for c in first.prefill] == ["a"] and first.decode == []
    scheduler.add_request(make_request("b"))
    second = run_iteration(scheduler)
    assert [r.req_id for r in second.decode] == ["a"]
    assert [c.request.req_id for c in second.prefill] == ["b"]
    third = run_iteration(scheduler)
    assert [r.req_id for r in third.decode] == ["a", "b"] and third.decode_span == 2


def test_length_finish_frees_row_and_next_boundary_compacts_tail_into_hole():
    scheduler = make_scheduler()
    for name, max_tokens in [("a", 1), ("b", 5), ("c", 5)]:
        scheduler.add_request(make_request(name, max_tokens=max_tokens))
    out = run_iteration(scheduler)  # prefill: a gets its only token and finishes
    assert [c.request.row for c in out.prefill] == [0, 1, 2]
    a, b, c = (chunk.request for chunk in out.prefill)
    assert a.status == RequestStatus.FINISHED_LENGTH and scheduler.num_running == 2
    out = run_iteration(scheduler)
    assert len(out.moves) == 1
    move = out.moves[0]
    assert (move.src, move.dst) == (2, 0) and move.length == c.num_prompt_tokens
    assert c.row == 0 and b.row == 1 and out.decode_span == 2
    assert [r.req_id for r in out.decode] == ["c", "b"]


def test_compaction_off_leaves_hole_in_span_and_reuses_it():
    scheduler = make_scheduler(compaction=False)
    for name, max_tokens in [("a", 1), ("b", 5), ("c", 5)]:
        scheduler.add_request(make_request(name, max_tokens=max_tokens))
    run_iteration(scheduler)
    out = run_iteration(scheduler)
    assert out.moves == [] and out.decode_span == 3 and [r.row for r in out.decode] == [1, 2]
    scheduler.add_request(make_request("d"))
    out = run_iteration(scheduler)
    assert out.prefill[0].request.row == 0


def test_full_arena_queues_fifo_and_admits_as_rows_free():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", max_tokens=2))
    out = run_iteration(scheduler)
    assert [c.request.req_id for c in out.prefill] == ["r0", "r1"] and scheduler.num_waiting == 2
    run_iteration(scheduler)  # r0, r1 reach max_tokens
    out = run_iteration(scheduler)
    assert [c.request.req_id for c in out.prefill] == ["r2", "r3"]


def test_abort_waiting_and_running_leave_at_the_boundary():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_request("run", max_tokens=9), make_request("wait", max_tokens=9)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    run_iteration(scheduler)
    scheduler.abort("run")
    scheduler.abort("wait")
    scheduler.abort("unknown")
    out = scheduler.schedule(0.0)
    assert {r.req_id for r in out.aborted} == {"run", "wait"}
    assert running.status == waiting.status == RequestStatus.FINISHED_ABORT
    assert scheduler.rows.num_live == 0 and not scheduler.has_work()


def test_window_waits_for_its_window_then_runs_batch_to_completion():
    scheduler = make_scheduler(policy="window", window_ms=100, max_batch=3)
    scheduler.add_request(make_request("a", arrival=0.0, max_tokens=3))
    assert scheduler.schedule(0.05).prefill == []
    assert scheduler.seconds_until_admission(0.05) == pytest.approx(0.05)
    scheduler.add_request(make_request("b", arrival=0.06, max_tokens=1))
    out = run_iteration(scheduler, now=0.1)
    assert [c.request.req_id for c in out.prefill] == ["a", "b"]
    scheduler.add_request(make_request("c", arrival=0.11))
    out = run_iteration(scheduler, now=0.5)  # c waits although a row is free: the batch still runs
    assert out.prefill == [] and [r.req_id for r in out.decode] == ["a"]
    run_iteration(scheduler, now=0.6)  # a finishes
    out = run_iteration(scheduler, now=0.7)
    assert [c.request.req_id for c in out.prefill] == ["c"]


def test_window_closes_early_when_batch_is_full():
    scheduler = make_scheduler(policy="window", window_ms=1000, max_batch=2)
    scheduler.add_request(make_request("a"))
    scheduler.add_request(make_request("b"))
    assert scheduler.seconds_until_admission(0.0) == 0.0
    assert len(scheduler.schedule(0.0).prefill) == 2


def test_solo_runs_one_request_at_a_time():
    scheduler = make_scheduler(policy="solo")
    scheduler.add_request(make_request("a", max_tokens=2))
    scheduler.add_request(make_request("b", max_tokens=2))
    assert [c.request.req_id for c in run_iteration(scheduler).prefill] == ["a"]
    out = run_iteration(scheduler)
    assert out.prefill == [] and [r.req_id for r in out.decode] == ["a"]
    assert [c.request.req_id for c in run_iteration(scheduler).prefill] == ["b"]


def test_long_prompts_enter_in_chunks_within_the_budget_while_others_decode():
    scheduler = make_scheduler(max_prefill_tokens=8)
    scheduler.add_request(make_request("short", prompt_len=3, max_tokens=20))
    out = run_iteration(scheduler)
    assert [(c.start, c.end, c.is_last) for c in out.prefill] == [(0, 3, True)]
    scheduler.add_request(make_request("long", prompt_len=19, max_tokens=20))
    spans = []
    for _ in range(3):
        out = run_iteration(scheduler)
        assert [r.req_id for r in out.decode] == ["short"]  # never held up by the long prompt
        spans += [(c.start, c.end, c.is_last) for c in out.prefill]
        long = out.prefill[0].request
        assert long.num_cached_tokens == out.prefill[0].end and long.num_output_tokens == int(out.prefill[0].is_last)
    assert spans == [(0, 8, False), (8, 16, False), (16, 19, True)]
    assert [r.req_id for r in out.scheduled] == ["short", "long"]  # the long one's first token, last
    out = run_iteration(scheduler)
    assert [r.req_id for r in out.decode] == ["short", "long"] and out.prefill == []


def test_the_budget_is_shared_oldest_prompt_first():
    scheduler = make_scheduler(max_prefill_tokens=10)
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(name, prompt_len=6, max_tokens=4))
    out = run_iteration(scheduler)
    assert [(c.request.req_id, c.start, c.end) for c in out.prefill] == [("a", 0, 6), ("b", 0, 4)]
    assert [r.req_id for r in out.admitted] == ["a", "b", "c"]  # rows are taken at once
    out = run_iteration(scheduler)
    assert [(c.request.req_id, c.start, c.end) for c in out.prefill] == [("b", 4, 6), ("c", 0, 6)]
    assert [r.req_id for r in out.decode] == ["a"] and out.decode_span == 1
