"""Replayable traces: the same seeds give the same trace; another prompt seed changes only the prompts' tokens."""

from clients.workload import make_trace


def shape(trace) -> list[tuple]:
    return [(item.arrival_s, len(item.prompt_token_ids), item.max_tokens) for item in trace]


def test_prompt_seeds_change_the_prompts_only():
    def trace(prompt_seed: int):
        return make_trace(20, mean_gap_s=0.1, gen_len=(4, 90), prompt_len=(5, 300), seed=3, prompt_seed=prompt_seed)

    assert trace(7) == trace(7)
    assert shape(trace(7)) == shape(trace(8))
    assert all(a.prompt_token_ids != b.prompt_token_ids for a, b in zip(trace(7), trace(8)))
