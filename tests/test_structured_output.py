"""Structured output in the engine: guided_json / guided_regex / guided_choice rows give valid output that ends
with finish_reason stop on the built-in random model, through either sampling pass; a constrained row leaves
its unconstrained neighbour's tokens unchanged; every guided input is bounded and a bad one is refused naming it."""

import json
import re
from dataclasses import replace

import jsonschema
import pytest
import torch

from flover_backend import Engine, EngineConfig, SamplingParams
from flover_backend.errors import InvalidRequestError
from flover_backend.execution.models.builtin import EOS_TOKEN_ID, VOCAB_SIZE, build_tokenizer
from flover_backend.native import sampling as native_sampling
from flover_backend.request import Request
from flover_backend.sampling.grammar import GrammarCompiler, apply_guides
from flover_backend.sampling.sampler import Sampler
from flover_backend.sampling.structured_output import (
    MAX_CHOICES,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    guided_decoding,
)
from tests.native_kernels import built

# Every string, number and list bounded: the grammar is finite, so even a random model's output must end.
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    "kind": {"enum": ["cat", "dog", "eel"]},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "kind", "ok"], "additionalProperties": False}
# Bytes a PERSON can take: each string character at most 4 UTF-8 bytes, and no token spells less than a byte.
MAX_PERSON_TOKENS = 200
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe so", "\"quoted\""]


def engine_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"model": "builtin:tiny", "max_num_seqs": 4, "max_model_len": 320, "num_threads": 1,
                           **overrides})


@pytest.fixture(scope="module")
def engine():
    engine = Engine(engine_config())
    yield engine
    engine.stop()


def run(engine: Engine, jobs: list[tuple[str, SamplingParams]]) -> list[list]:
    """Submit every job at once and drive the engine on this thread until idle; each job's outputs."""
    outputs: dict = {}
    ids = [engine.add_request(prompt, params, on_output=lambda o: outputs.setdefault(o.req_id, []).append(o))
           for prompt, params in jobs]
    engine.run_until_idle()
    return [outputs[req_id] for req_id in ids]


def text(outputs: list) -> str:
    return "".join(output.new_text for output in outputs)


def token_ids(outputs: list) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0}, {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
                                      {"temperature": 1.0, "repetition_penalty": 1.3}],
                         ids=["greedy", "sampled", "top-k-top-p", "penalized"])
def test_json_schema_rows_give_valid_json_and_stop(engine, sampling):
    jobs = [(prompt, SamplingParams(max_tokens=MAX_PERSON_TOKENS, seed=seed, guided_json=PERSON, **sampling))
            for seed, prompt in enumerate(["Once upon a time", "a", "The quick brown fox", "0123456789"])]
    for outputs in run(engine, jobs):
        assert outputs[-1].finish_reason == "stop", text(outputs)
        value = json.loads(text(outputs))  # strict: no raw control characters, valid UTF-8
        jsonschema.validate(value, PERSON)
        assert text(outputs) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # compact
        assert EOS_TOKEN_ID not in token_ids(outputs)  # the grammar's end stops it; no step spent on an eos


def test_regex_and_choice_rows_match_and_stop(engine):
    jobs = [("Once upon a time", SamplingParams(max_tokens=20, temperature=1.0, seed=seed, guided_regex=REGEX))
            for seed in range(4)]
    jobs += [("Zebras", SamplingParams(max_tokens=20, temperature=1.0, seed=seed, guided_choice=CHOICES))
             for seed in range(8)]
    results = run(engine, jobs)
    for outputs in results[:4]:
        assert re.fullmatch(REGEX, text(outputs)), text(outputs)
        assert outputs[-1].finish_reason == "stop"
    chosen = [text(outputs) for outputs in results[4:]]
    assert set(chosen) <= set(CHOICES) and all(o[-1].finish_reason == "stop" for o in results[4:])
    assert len(set(chosen)) > 1  # sampled among the choices, not stuck on one


def test_any_json_object_ends_at_max_tokens_as_length_when_unbounded(engine):
    # {"type": "object"} leaves keys and strings unbounded: a random model may not close them in 12 tokens.
    [outputs] = run(engine, [("a", SamplingParams(max_tokens=12, temperature=1.0, seed=0,
                                                  guided_json={"type": "object"}))])
    assert outputs[-1].finish_reason in ("length", "stop")
    assert text(outputs).startswith("{")
    if outputs[-1].finish_reason == "stop":
        assert isinstance(json.loads(text(outputs)), dict)


def test_the_grammar_ends_the_request_even_with_ignore_eos(engine):
    [outputs] = run(engine, [("a", SamplingParams(max_tokens=20, ignore_eos=True, guided_choice=["done"]))])
    assert text(outputs) == "done" and outputs[-1].finish_reason == "stop"


@pytest.mark.parametrize("neighbour", [SamplingParams(max_tokens=40, ignore_eos=True),
                                       SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.0, seed=7)],
                         ids=["greedy", "sampled"])
def test_a_constrained_row_leaves_its_neighbours_tokens_unchanged(engine, neighbour):
    free = SamplingParams(max_tokens=MAX_PERSON_TOKENS, temperature=1.0, seed=1)
    beside_free = run(engine, [("Once upon a time", neighbour), ("The quick brown fox", free)])
    beside_guided = run(engine, [("Once upon a time", neighbour),
                                 ("The quick brown fox", SamplingParams(max_tokens=MAX_PERSON_TOKENS, temperature=1.0,
                                                                        seed=1, guided_json=PERSON))])
    assert token_ids(beside_guided[0]) == token_ids(beside_free[0])
    assert len(token_ids(beside_guided[0])) == 40
    jsonschema.validate(json.loads(text(beside_guided[1])), PERSON)
    assert token_ids(beside_guided[1]) != token_ids(beside_free[1])  # the constraint did act on its own row


@pytest.fixture(scope="module")
def grammars():
    return GrammarCompiler(build_tokenizer(), VOCAB_SIZE, frozenset({EOS_TOKEN_ID}))


@pytest.mark.parametrize("kernel_pass", [False, True], ids=["torch-pass", "kernel-pass"])
def test_both_sampling_passes_draw_only_tokens_the_grammar_allows(grammars, kernel_pass):
    sampler = Sampler(eos_token_ids=frozenset({EOS_TOKEN_ID}),
                      kernel=built(native_sampling) if kernel_pass else None)
    params = SamplingParams(max_tokens=MAX_PERSON_TOKENS, temperature=1.0, top_k=200, guided_json=PERSON)
    requests = [Request(f"req-{i}", [1], replace(params, seed=i),
                        guide=grammars.compile(params.guided)) for i in range(3)]
    requests.append(Request("free", [1], SamplingParams(max_tokens=MAX_PERSON_TOKENS, temperature=1.0, seed=9)))
    generator = torch.Generator().manual_seed(0)
    tokenizer = build_tokenizer()
    for _ in range(MAX_PERSON_TOKENS):
        live = [r for r in requests if not (r.guide is not None and r.guide.finished)]
        if len(live) == 1:
            break
        out = sampler(torch.randn(len(live), VOCAB_SIZE, generator=generator) * 3, live)
        assert not out.errors
        for request, token_id in zip(live, out.token_ids):
            request.output_token_ids.append(token_id)
            if request.guide is not None:
                assert request.guide.accept(token_id), token_id
    for request in requests[:3]:
        assert request.guide.finished
        jsonschema.validate(json.loads(tokenizer.decode(request.output_token_ids)), PERSON)


class _DeadEnd:
    """A guide whose grammar allows nothing next, as one needing what the vocabulary cannot spell would."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0


def test_a_grammar_that_allows_no_token_fails_its_row_alone():
    sampler = Sampler()
    guided = SamplingParams(guided_regex="a")
    requests = [Request("dead", [1], guided, guide=_DeadEnd()), Request("free", [1], SamplingParams())]
    logits = torch.randn(2, VOCAB_SIZE)
    out = sampler(logits, requests)
    assert "grammar allows none" in out.errors[0]
    assert 1 not in out.errors and out.token_ids[1] == int(logits[1].argmax())


@pytest.mark.parametrize(("values", "field"), [
    ({"guided_json": {"type": "strin"}}, "guided_json"),
    ({"guided_json": '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}'}, "guided_json"),
    ({"guided_regex": "(ab"}, "guided_regex"),
])
def test_a_schema_or_regex_that_cannot_compile_is_refused_naming_it(engine, values, field):
    with pytest.raises(InvalidRequestError) as caught:
        engine.add_request("a", SamplingParams(**values), on_output=lambda output: None)
    assert caught.value.field == field and "cannot be compiled" in str(caught.value)


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(("values", "field", "message"), [
    ({"guided_json": "x" * (MAX_SCHEMA_BYTES + 1)}, "guided_json", "longer than"),
    ({"guided_json": {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}}, "guided_json", "longer than"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": "[1, 2]"}, "guided_json", "must be a JSON object"),
    ({"guided_json": _nested(MAX_SCHEMA_DEPTH + 1)}, "guided_json", "levels deep"),
    ({"guided_regex": "a" * (MAX_REGEX_CHARS + 1)}, "guided_regex", "at most"),
    ({"guided_regex": ""}, "guided_regex", "non-empty"),
    ({"guided_choice": []}, "guided_choice", "list of 1 to"),
    ({"guided_choice": ["a"] * (MAX_CHOICES + 1)}, "guided_choice", "list of 1 to"),
    ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty string"),
    ({"guided_choice": "yes"}, "guided_choice", "list of 1 to"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give one of"),
    ({"guided_choice": ["a"], "min_tokens": 1}, "min_tokens", "grammar decides"),
])
def test_guided_inputs_are_bounded_before_any_compiling(values, field, message):
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams.from_dict(values)
    assert caught.value.field == field and message in caught.value.message


def test_guided_inputs_parse_from_a_dict_or_text_alike():
    as_dict = SamplingParams.from_dict({"guided_json": {"type": "object", "properties": {"b": {}, "a": {}}}})
    as_text = SamplingParams.from_dict({"guided_json": '{"type": "object", "properties": {"b": {}, "a": {}}}'})
    assert as_dict.guided == as_text.guided
    assert as_dict.guided.source == '{"type":"object","properties":{"b":{},"a":{}}}'  # key order kept
    assert guided_decoding() is None and SamplingParams().guided is None
    assert _nested(MAX_SCHEMA_DEPTH) and SamplingParams(guided_json=_nested(MAX_SCHEMA_DEPTH)).guided


def test_a_constrained_row_asking_for_logprobs_gets_the_raw_distributions(grammars):
    # Its grammar masks a copy, not the logits the logprobs are read from (vLLM's default: raw logprobs).
    sampler = Sampler(eos_token_ids=frozenset({EOS_TOKEN_ID}))
    guided = SamplingParams(guided_choice=["yes", "no"], logprobs=0)
    logits = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    raw = logits.clone()
    out = sampler(logits, [Request("guided", [1], guided, guide=grammars.compile(guided.guided)),
                           Request("free", [1], SamplingParams(logprobs=0))])
    token_id = out.token_ids[0]
    assert build_tokenizer().decode([token_id]) in ("y", "ye", "yes", "n", "no")
    assert torch.equal(logits, raw)
    assert out.logprobs[0].logprob == pytest.approx(float(raw[0].log_softmax(-1)[token_id]), abs=1e-5)
    assert out.token_ids[1] == int(raw[1].argmax())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_equal_xgrammars_own_kernel_on_a_padded_vocabulary(dtype):
    import xgrammar

    vocab_size = VOCAB_SIZE + 13  # a model's padded head: ids past the tokenizer's are never allowed
    grammars = GrammarCompiler(build_tokenizer(), vocab_size, frozenset({EOS_TOKEN_ID}))
    guides = [grammars.compile(guided_decoding(guided_json=PERSON)) for _ in range(3)]
    for token_id in build_tokenizer().encode('{"name":"ab', add_special_tokens=False).ids:
        assert guides[1].accept(token_id)  # inside a string: most tokens allowed; guides[0] and [2] at the start
    logits = torch.randn(5, vocab_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = logits.clone()
    bitmask = xgrammar.allocate_token_bitmask(5, vocab_size)
    for row, guide in zip((0, 2, 3), guides):
        guide.fill(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab_size, indices=[0, 2, 3])
    assert apply_guides(logits, [0, 2, 3], guides) == []
    assert torch.equal(logits, want)
    assert torch.isinf(logits[2, VOCAB_SIZE:]).all() and not torch.isinf(logits[1]).any()
