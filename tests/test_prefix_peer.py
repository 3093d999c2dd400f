"""The prefix side-by-side's traces, closed loop, counters and comparison (benchmarks/prefix_peer.py), no servers."""

from __future__ import annotations

import pytest

from benchmarks.prefix_peer import (
    FULL_SHAPE,
    SMOKE_SHAPE,
    ConversationPlan,
    cache_config,
    compare,
    conversation_plan,
    counter,
    prefix_section,
    run_conversations,
    shared_prefix_trace,
)


def test_shared_prefix_trace_is_issue_24s_with_fresh_prompts_each_attempt():
    first, second = shared_prefix_trace(FULL_SHAPE, 0), shared_prefix_trace(FULL_SHAPE, 1)
    assert len(first) == 32 and all(len(r.prompt_token_ids) == 320 + 16 and r.max_tokens == 64 for r in first)
    assert len({r.prompt_token_ids[:320] for r in first}) == 1  # one shared prefix
    assert len({r.prompt_token_ids[320:] for r in first}) == 32  # each its own tokens
    assert [r.arrival_s for r in first] == [r.arrival_s for r in second]  # same arrivals every run
    assert first[0].prompt_token_ids[:320] != second[0].prompt_token_ids[:320]  # nothing cached across runs
    assert not {r.prompt_token_ids[320:] for r in first} & {r.prompt_token_ids[320:] for r in second}


def test_conversation_plan_keeps_starts_and_changes_tokens_between_attempts():
    first, second = conversation_plan(FULL_SHAPE, 0), conversation_plan(FULL_SHAPE, 1)
    assert first.starts == second.starts and len(first.starts) == 8 and first.starts[0] == 0.0
    assert first.system != second.system and first.messages != second.messages
    assert len(first.messages) == 8 and all(len(c) == 4 and all(len(m) == 16 for m in c) for c in first.messages)


def test_each_turn_is_the_previous_prompt_its_answer_and_the_next_message():
    plan = conversation_plan(SMOKE_SHAPE, 0)
    plan = ConversationPlan(plan.system, plan.messages, (0.0, 0.0), plan.turn_tokens)  # both at once

    def answer_to(prompt: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sum(prompt) % 250 + 3 + i for i in range(plan.turn_tokens))

    def stream(item, timing):
        timing.token_times.extend([timing.arrival] * item.max_tokens)
        return list(answer_to(item.prompt_token_ids))

    timings, sent = run_conversations(plan, stream)
    assert len(sent) == len(timings) == 2 * 2
    for conversation in range(2):
        opening = plan.system + plan.messages[conversation][0]
        turns = [index for index, item in enumerate(sent) if item.prompt_token_ids[:len(opening)] == opening]
        first, second = turns
        assert sent[first].prompt_token_ids == opening
        assert sent[second].prompt_token_ids == (opening + answer_to(opening) + plan.messages[conversation][1])
        assert timings[second].arrival >= timings[first].end  # closed loop: a turn waits for the previous answer
    assert all(t.num_tokens == plan.turn_tokens and t.end is not None for t in timings)


def test_a_short_answer_fails_the_run():
    plan = conversation_plan(SMOKE_SHAPE, 0)
    with pytest.raises(RuntimeError, match="conversations failed"):
        run_conversations(plan, lambda item, timing: [5] * (item.max_tokens - 1))


def test_counter_sums_labels_and_ignores_other_names(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.write_text('# HELP vllm:prefix_cache_hits_total hits\nvllm:prefix_cache_hits_total{engine="0"} 12.0\n'
                       'vllm:prefix_cache_hits_total{engine="1"} 3.0\nvllm:prefix_cache_hits_created 1.7e9\n'
                       "flover_prefix_cache_hits_total 5\n")
    assert counter(metrics.as_uri(), "vllm:prefix_cache_hits_total") == 15.0
    assert counter(metrics.as_uri(), "flover_prefix_cache_hits_total") == 5.0
    assert counter(metrics.as_uri(), "flover_prefix_cache_queries_total") == 0.0
    assert cache_config(metrics.as_uri()) == {}


def test_cache_config_reads_vllms_prefix_caching_and_block_size(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.write_text('vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",'
                       'engine="0"} 1.0\n')
    assert cache_config(metrics.as_uri()) == {"enable_prefix_caching": "True", "block_size": "128"}


def _run(tokens_per_s: float, ttft: float, tpot: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "ttft_p50_s": ttft, "tpot_p50_s": tpot, "cached_prompt_tokens": 10.0,
            "prompt_tokens": 20}


def test_compare_takes_best_runs_by_tokens_per_s_and_checks_the_targets():
    case = compare({"flover": [_run(100, 0.2, 0.05), _run(130, 0.3, 0.04)], "vllm": [_run(100, 0.25, 0.06)]})
    assert case["best"]["flover"]["tokens_per_s"] == 130
    assert case["flover_over_vllm"]["tokens_per_s"] == pytest.approx(1.3)
    assert case["flover_over_vllm"]["ttft_p50_s"] == pytest.approx(1.2)
    assert case["targets_met"] == {"ttft_p50_at_most_vllm": False, "tokens_per_s_at_least_1.25x": True}
    alone = compare({"flover": [_run(100, 0.2, 0.05)], "vllm": []})
    assert "flover_over_vllm" not in alone and "targets_met" not in alone
    results = {"cpu": "test CPU", "model": "builtin:small", "shape": FULL_SHAPE.__dict__, "repeats": 1,
               "vllm": "vLLM", "vllm_cache_config": {"enable_prefix_caching": "True", "block_size": "128"}, "traces": {"shared_prefix": case, "multi_turn": alone}}
    text = "\n".join(prefix_section(results))
    assert "test CPU" in text and "**1.30x**" in text and "blocks of 128 tokens" in text and "TTFT p50 <= vLLM's: not met" in text
