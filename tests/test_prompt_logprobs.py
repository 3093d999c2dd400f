"""Prompt logprobs from the prefill forward: transformers' log-softmax on the same fp32 weights, whole or in
chunks, eagerly or through the padded prefill graphs; only for the request that asks, its neighbours unchanged."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flover_backend import Engine, EngineConfig, InvalidRequestError, SamplingParams
from tests.test_engine import static_prefill

PROMPT = "Temporal fusion joins requests at every iteration boundary."
NEIGHBOUR = "A neighbour that asks for nothing"
NUM_TOP = 3


@pytest.fixture(scope="module")
def hf_prompt_logprobs(tiny_checkpoint):
    """transformers' log-softmax after each prefix of a prompt (ids): (len - 1, vocab), row i for token i + 1."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()

    def logprobs(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([token_ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)[:-1]

    return logprobs


def serve(overrides: dict, prepare=None) -> tuple[Engine, dict[str, list]]:
    """Run the asking request beside a neighbour that asks nothing, in one engine; their outputs by prompt."""
    config = EngineConfig(model="builtin:tiny", max_num_seqs=4, max_model_len=96, num_threads=1, **overrides)
    engine = Engine(config)
    outputs: dict[str, list] = {PROMPT: [], NEIGHBOUR: []}
    try:
        if prepare is not None:
            prepare(engine)
        engine.add_request(NEIGHBOUR, SamplingParams(max_tokens=8, ignore_eos=True),
                           on_output=outputs[NEIGHBOUR].append)
        engine.step()  # the neighbour is decoding when the asking request's prompt goes in
        engine.add_request(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=NUM_TOP),
                           on_output=outputs[PROMPT].append)
        engine.run_until_idle()
    finally:
        engine.stop()
    return engine, outputs


@pytest.mark.parametrize("overrides,graphs", [({}, False), ({"max_prefill_tokens": 5}, False),
                                              ({"max_prefill_tokens": 7, "compaction": False}, False),
                                              ({}, True), ({"max_prefill_tokens": 5}, True)],
                         ids=["fused", "chunked", "chunked-holes", "graphs", "graphs-chunked"])
def test_prompt_logprobs_equal_transformers(hf_prompt_logprobs, overrides, graphs):
    widths: list[int] = []
    engine, outputs = serve(overrides, static_prefill(widths) if graphs else None)
    assert bool(widths) == graphs  # the asking prompt's first chunk went through a padded graph width
    prompt_ids = engine.tokenizer.encode(PROMPT).ids
    want = hf_prompt_logprobs(prompt_ids)
    first, *rest = outputs[PROMPT]
    assert first.new_token_ids and all(o.prompt_logprobs is None for o in rest)  # sent once, with the first token
    entries = first.prompt_logprobs
    assert [entry.token_id for entry in entries] == prompt_ids[1:]
    for position, entry in enumerate(entries):
        token = prompt_ids[position + 1]
        assert entry.logprob == pytest.approx(want[position, token].item(), abs=1e-4)
        assert entry.rank == 1 + int((want[position] > want[position, token]).sum())
        top = want[position].topk(NUM_TOP)
        assert entry.top_token_ids == top.indices.tolist()
        assert entry.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(o.prompt_logprobs is None for o in outputs[NEIGHBOUR])


def test_a_prompt_asking_for_logprobs_computes_what_a_cached_prefix_holds(hf_prompt_logprobs):
    """Prefix reuse copies keys, not logits: a request that asks for prompt logprobs after the same prompt ran
    (its row retained) computes its whole prompt, and its logprobs are transformers'."""
    config = EngineConfig(model="builtin:tiny", max_num_seqs=4, max_model_len=96, num_threads=1)
    with Engine(config) as engine:
        list(engine.generate(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True)))
        again = list(engine.generate(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True)))
        asked = list(engine.generate(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=0)))
        prompt_ids = engine.tokenizer.encode(PROMPT).ids
    assert again[-1].num_cached_tokens == len(prompt_ids) - 1  # the plain repeat reused the retained row
    assert asked[-1].num_cached_tokens == 0
    want = hf_prompt_logprobs(prompt_ids)
    got = [entry.logprob for entry in asked[0].prompt_logprobs]
    assert got == pytest.approx([want[i, t].item() for i, t in enumerate(prompt_ids[1:])], abs=1e-4)


def test_asking_changes_no_tokens_of_the_request_or_its_neighbour():
    _, asked = serve({"max_prefill_tokens": 5})
    config = EngineConfig(model="builtin:tiny", max_num_seqs=4, max_model_len=96, num_threads=1,
                          max_prefill_tokens=5)
    with Engine(config) as engine:
        plain = {prompt: [t for o in engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
                          for t in o.new_token_ids] for prompt, n in ((PROMPT, 4), (NEIGHBOUR, 8))}
    assert {prompt: [t for o in outs for t in o.new_token_ids] for prompt, outs in asked.items()} == plain


def test_a_one_token_prompt_has_no_prompt_logprobs():
    with Engine(EngineConfig(model="builtin:tiny", max_num_seqs=2, max_model_len=32, num_threads=1)) as engine:
        outputs = list(engine.generate(prompt_token_ids=[5], params=SamplingParams(max_tokens=1, prompt_logprobs=0)))
    assert outputs[0].prompt_logprobs == []


@pytest.mark.parametrize("value", [-1, 21, 2.0, True, "3"])
def test_prompt_logprobs_out_of_range_names_the_field(value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(prompt_logprobs=value)
    assert info.value.field == "prompt_logprobs"
