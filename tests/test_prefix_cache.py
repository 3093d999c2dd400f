"""Prefix reuse: an arrival copies the keys of its prompt's longest start that a running or retained row holds,
and every output stays token for token what it is with reuse off."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.engine.prefix_cache import WHOLE_ROW, common_prefix_len
from flover_backend.engine.scheduler import Scheduler
from flover_backend.execution.row_table import RowMove, RowTable
from flover_backend.native import attention as native_attention
from flover_backend.request import Request, RequestStatus

SHARED = [40 + (7 * i) % 150 for i in range(30)]  # a 30-token "system prompt"
FILLER = [200, 201, 202, 203]


def config(**overrides) -> EngineConfig:
    return EngineConfig(**{"model": "builtin:tiny", "max_num_seqs": 4, "max_model_len": 96, "num_threads": 1,
                           **overrides})


@pytest.mark.parametrize(("a", "b", "limit", "expected"), [
    ([1, 2, 3], [1, 2, 3], 10, 3), ([1, 2, 3], [1, 2, 3], 2, 2), ([1, 2, 3], [9, 2, 3], 10, 0),
    ([1, 2, 3, 4, 5], [1, 2, 3, 9, 5], 10, 3), ([1, 2], [1, 2, 3], 10, 2), ([], [1], 10, 0),
    (list(range(1000)), list(range(999)) + [0], 5000, 999),
])
def test_common_prefix_len(a, b, limit, expected):
    assert common_prefix_len(a, b, limit) == expected == common_prefix_len(b, a, limit)


def test_compaction_moves_a_retained_row_out_of_the_dense_span_before_a_live_row_lands_on_it():
    table = RowTable(6, compaction=True, max_retained=2)
    assert [table.allocate(req_id) for req_id in "abc"] == [0, 1, 2]
    assert table.retain(1) and table.num_live == 2 and table.num_free == 3 and table.num_available == 4
    moves = table.plan_compaction({"a": 5, "b": 4, "c": 6})
    assert moves == [RowMove(1, 5, 4), RowMove(2, 1, 6)]  # b out to the highest free row first, then c in
    assert table.retained == {"b": 5} and [table.owner(row) for row in range(3)] == ["a", "c", None]


def test_a_retained_row_is_dropped_when_compaction_has_no_free_row_to_move_it_to():
    table = RowTable(3, compaction=True, max_retained=2)
    for req_id in "abc":
        table.allocate(req_id)
    table.retain(0)
    assert table.plan_compaction({"a": 3, "b": 3, "c": 3}) == [RowMove(2, 0, 3)]
    assert table.retained == {} and table.num_free == 1


def test_arrivals_take_retained_rows_least_recently_used_first_and_the_bound_drops_the_oldest():
    table = RowTable(3, compaction=False, max_retained=2)
    for req_id in "abc":
        table.allocate(req_id)
    for row in range(3):  # the third retain drops a, the least recently used
        table.retain(row)
    assert list(table.retained) == ["b", "c"] and table.num_free == 1
    table.touch("b")
    assert table.allocate("d") == 0  # the free row first
    assert table.allocate("e") == 2  # then c's, used longest ago
    assert table.retained == {"b": 1} and table.num_available == 1


def test_retaining_nothing_frees_the_row():
    table = RowTable(2, max_retained=0)
    row = table.allocate("a")
    assert not table.retain(row) and table.num_free == 2


def test_scheduler_copies_the_longest_held_start_and_leaves_the_last_prompt_token_to_compute():
    scheduler = Scheduler(EngineConfig(max_num_seqs=4))
    donor = Request("d", SHARED + [1, 2], SamplingParams(max_tokens=4))
    scheduler.add_request(donor)
    scheduler.schedule(0.0)
    donor.output_token_ids.append(9)
    same = Request("same", SHARED + [1, 2], SamplingParams(max_tokens=4))
    longer = Request("longer", SHARED + [1, 2, 9, 3], SamplingParams(max_tokens=4))
    for request in (same, longer):
        scheduler.add_request(request)
    out = scheduler.schedule(0.0)
    # `same` is all cached but its last token; `longer` reads donor's prompt and its first output (32 positions).
    assert out.prefix_copies == [RowMove(donor.row, same.row, 31), RowMove(donor.row, longer.row, 32)]
    assert [(chunk.request.req_id, chunk.start) for chunk in out.prefill] == [("same", 31), ("longer", 32)]
    assert same.num_prefix_cached_tokens == 31


def test_rows_copied_from_one_prefix_name_one_source_and_only_the_positions_they_hold_of_it():
    """The shared-prefix attention reads a group's copied positions from one of its rows, so a row must name a
    source only for positions that are that source's bits: a copy of a copy passes on the first copy's length."""
    scheduler = Scheduler(EngineConfig(max_num_seqs=8))
    origin = Request("origin", SHARED + [1, 2], SamplingParams(max_tokens=4))
    scheduler.add_request(origin)
    scheduler.schedule(0.0)
    assert origin.kv_source is None  # nobody has copied from it yet
    short = Request("short", SHARED[:20] + [90 + i for i in range(20)], SamplingParams(max_tokens=4))
    scheduler.add_request(short)
    scheduler.schedule(0.0)
    assert origin.kv_source is not None and origin.kv_source_len == WHOLE_ROW
    assert (short.kv_source, short.kv_source_len) == (origin.kv_source, 20)
    scheduler.schedule(0.0)  # short's own tokens are in its row now
    via_short = Request("via", SHARED[:20] + [90 + i for i in range(15)] + [3], SamplingParams(max_tokens=4))
    scheduler.add_request(via_short)
    out = scheduler.schedule(0.0)
    assert out.prefix_copies == [RowMove(short.row, via_short.row, 35)]  # 35 positions copied from `short`...
    assert (via_short.kv_source, via_short.kv_source_len) == (origin.kv_source, 20)  # ...20 of them origin's bits
    alone = Request("alone", [300 + i for i in range(12)], SamplingParams(max_tokens=4))
    scheduler.add_request(alone)
    scheduler.schedule(0.0)
    assert alone.kv_source is None


def test_a_retained_row_keeps_the_source_its_keys_are_and_names_one_when_first_copied():
    scheduler = Scheduler(EngineConfig(max_num_seqs=4))
    done = Request("done", SHARED, SamplingParams(max_tokens=1))
    scheduler.add_request(done)
    scheduler.schedule(0.0)
    done.output_token_ids.append(5)
    scheduler.finish(done, RequestStatus.FINISHED_LENGTH)
    first, second = (Request(name, SHARED + [7, i], SamplingParams(max_tokens=1)) for i, name in enumerate("ab"))
    for request in (first, second):
        scheduler.add_request(request)
        scheduler.schedule(0.0)
    assert first.kv_source is not None and (first.kv_source, first.kv_source_len) == (second.kv_source, 30)


def test_a_finished_request_is_retained_and_an_error_is_not():
    scheduler = Scheduler(EngineConfig(max_num_seqs=4))
    done, failed = (Request(req_id, SHARED, SamplingParams(max_tokens=1)) for req_id in ("done", "failed"))
    for request in (done, failed):
        scheduler.add_request(request)
    scheduler.schedule(0.0)
    for request in (done, failed):
        request.output_token_ids.append(5)
    scheduler.finish(done, RequestStatus.FINISHED_LENGTH)
    scheduler.finish(failed, RequestStatus.FINISHED_ERROR)
    assert scheduler.rows.retained == {"done": done.row}
    arrival = Request("next", SHARED + [7], SamplingParams(max_tokens=1))
    scheduler.add_request(arrival)
    out = scheduler.schedule(0.0)
    assert out.prefix_copies == [RowMove(scheduler.rows.retained["done"], arrival.row, 30)]


def test_the_setting_turns_reuse_off():
    scheduler = Scheduler(EngineConfig(max_num_seqs=4, prefix_caching=False))
    first = Request("a", SHARED + [1], SamplingParams(max_tokens=4))
    scheduler.add_request(first)
    scheduler.schedule(0.0)
    first.output_token_ids.append(9)
    scheduler.add_request(Request("b", SHARED + [2], SamplingParams(max_tokens=4)))
    assert scheduler.schedule(0.0).prefix_copies == []


def serve(scenario: str, prefix_caching: bool, sampled: bool = False, **overrides) -> tuple[dict, dict, list]:
    """Filler, then a donor with the shared prefix, then an arrival sharing it, one iteration apart (driven by hand):
    at the arrival's boundary the filler's finish compacts the donor to row 0, and in `finishes` the donor ends
    in that same iteration, in `aborted` it is cancelled at that boundary. Tokens and cached tokens per job, and
    the schedules."""
    engine = Engine(config(prefix_caching=prefix_caching, **overrides))
    schedules = []
    schedule = engine.scheduler.schedule
    rows = []  # each boundary's rows, as they were then

    def recorded(now: float):
        schedules.append(schedule(now))
        rows.append({req_id: request.row for req_id, request in engine.scheduler.running.items()})
        return schedules[-1]

    engine.scheduler.schedule = recorded
    outputs: dict[str, list] = {}

    def params(max_tokens: int, seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **(
            {"temperature": 0.9, "top_p": 0.9, "seed": seed} if sampled else {}))

    def add(name: str, token_ids: list[int], max_tokens: int, seed: int) -> None:
        engine.add_request(prompt_token_ids=token_ids, params=params(max_tokens, seed), req_id=name,
                           on_output=lambda o: outputs.setdefault(o.req_id, []).append(o))

    try:
        add("filler", FILLER, 2, 1)
        engine.step()
        add("donor", SHARED + [5], 2 if scenario == "finishes" else 12, 2)
        engine.step()
        if scenario == "aborted":
            engine.abort("donor")
        add("arrival", SHARED + [6, 7], 10, 3)
        add("late", SHARED + [5, 8], 6, 4)  # shares 31 tokens with the donor, 30 with the arrival
        engine.run_until_idle()
    finally:
        engine.stop()
    tokens = {name: [t for o in outs for t in o.new_token_ids] for name, outs in outputs.items()}
    cached = {name: outs[-1].num_cached_tokens for name, outs in outputs.items()}
    return tokens, cached, list(zip(schedules, rows))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("scenario", ["moved", "finishes", "aborted"])
def test_outputs_with_reuse_equal_outputs_without(scenario, sampled, monkeypatch):
    grouped = []
    group_rows = native_attention.group_rows
    monkeypatch.setattr(native_attention, "group_rows", lambda *a: grouped.append(group_rows(*a)) or grouped[-1])
    with_reuse, cached, schedules = serve(scenario, True, sampled)
    # Rows holding the shared prefix's copies read it once (the kernel's shared-prefix attention) in some steps.
    assert any(groups is not None and len(groups.starts) < len(groups.order) + 1 for groups in grouped)
    without, no_cached, _ = serve(scenario, False, sampled)
    assert with_reuse == without
    assert set(no_cached.values()) == {0}
    assert cached["arrival"] == 30 and cached["late"] >= 30
    third, rows = schedules[2]  # the arrival's boundary
    assert [copy.dst for copy in third.prefix_copies] == [rows["arrival"], rows["late"]]
    if scenario == "aborted":
        assert [r.req_id for r in third.aborted] == ["donor"] and with_reuse["donor"] == without["donor"]
    else:  # the filler's finish moved the donor down at this boundary, and the arrival copied from where it landed
        assert RowMove(1, 0, 31) in third.moves and third.prefix_copies[0].src == 0
    if scenario == "finishes":
        assert len(with_reuse["donor"]) == 2 and third.decode[0].req_id == "donor"


@pytest.mark.parametrize("overrides", [{"compaction": False}, {"max_prefill_tokens": 16}, {"max_retained_prefixes": 0},
                                       {"max_num_seqs": 2}], ids=["holes", "chunked", "no-retained", "two-rows"])
def test_reuse_stays_exact_with_holes_chunks_no_retention_and_a_full_arena(overrides):
    """`chunked`: the arrivals come while the donor is part-way through its prompt and copy what it holds so far."""
    with_reuse, cached, _ = serve("moved", True, **overrides)
    assert with_reuse == serve("moved", False, **overrides)[0]
    assert sum(cached.values()) > 0


def test_two_tensor_parallel_ranks_copy_the_same_prefixes_and_give_the_same_tokens():
    """Every rank applies the plan's copies to its share of the heads (gloo on CPU)."""
    split, cached, _ = serve("moved", True, sampled=True, tensor_parallel_size=2)
    assert split == serve("moved", False, sampled=True)[0]
    assert cached["arrival"] == 30


def test_reuse_is_counted_in_the_stats_and_the_log_line(caplog):
    engine = Engine(config())
    try:
        with caplog.at_level(logging.INFO, logger="flover_backend.engine.engine"):
            for req_id in ("first", "again"):
                engine.add_request(prompt_token_ids=SHARED, params=SamplingParams(max_tokens=3, ignore_eos=True),
                                   req_id=req_id, on_output=lambda _: None)
                engine.run_until_idle()
        stats = engine.stats
        assert (stats.prefix_queried_tokens, stats.prefix_hit_tokens) == (2 * len(SHARED), len(SHARED) - 1)
        assert stats.num_prompt_tokens == 2 * len(SHARED)  # copied prompt tokens count as prompt tokens
        # Both rows are kept; each holds its prompt and all but its last token.
        assert stats.num_retained_rows == 2 and stats.kv_bytes_retained == 2 * (len(SHARED) + 2) * (
            engine.runner.arena.bytes_per_position)
        assert "finished first: " in caplog.text and "finished again: " in caplog.text
        assert f"again: finish_reason=length prompt_tokens={len(SHARED)} output_tokens=3 cached_tokens=29" in caplog.text
    finally:
        engine.stop()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_prefix_families_give_the_same_tokens_with_shared_reads_as_with_no_reuse(data):
    """Prompts built from a few stems and from earlier prompts and answers (copies of copies, retained donors,
    arrivals at random iterations), decoded with reuse and shared-prefix reads against reuse off: every
    request's tokens are the same, so no row ever reads a prefix its source does not hold."""
    stems = [[10 + (37 * i + 11 * s) % 180 for i in range(24)] for s in range(2)]
    plan = []  # (iteration it arrives at, prompt, max_tokens)
    for _ in range(data.draw(st.integers(3, 7), label="requests")):
        base = data.draw(st.sampled_from(stems + [p for _, p, _ in plan]), label="base")
        keep = data.draw(st.integers(0, len(base)), label="keep")
        tail = data.draw(st.lists(st.integers(1, 190), min_size=1, max_size=6), label="tail")
        plan.append((data.draw(st.integers(0, 6), label="at"), base[:keep] + tail, data.draw(st.integers(1, 12))))
    results = []
    for reuse in (False, True):
        engine = Engine(config(prefix_caching=reuse, max_num_seqs=4, max_retained_prefixes=2))
        outputs: dict[int, list[int]] = {}
        try:
            for iteration in range(7):
                for index, (at, prompt, max_tokens) in enumerate(plan):
                    if at == iteration:
                        engine.add_request(prompt_token_ids=prompt, req_id=str(index),
                                           params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                           on_output=lambda o, kept=outputs: kept.setdefault(int(o.req_id),
                                                                                              []).extend(o.new_token_ids))
                engine.step()
            engine.run_until_idle()
        finally:
            engine.stop()
        results.append(outputs)
    assert results[0] == results[1]
