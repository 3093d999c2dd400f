"""Triton inputs to engine requests: good inputs map across, bad ones name their field."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flover_backend.admission import AdmissionLimits
from flover_backend.errors import InvalidRequestError
from flover_backend.frontends.triton import parsing
from flover_backend.frontends.triton.schema import INPUTS
from flover_backend.param_table import BY_NAME
from flover_backend.server.repository import derive_repository, set_parameter
from flover_backend.triton_env import PROJECT_ROOT

LIMITS = AdmissionLimits(max_model_len=100, max_prompt_bytes=1000)


def parse_request(inputs):
    return parsing.parse_request(inputs, LIMITS)


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def test_defaults_and_explicit_inputs():
    parsed = parse_request({"text_input": text("hi")})
    assert parsed.prompt == "hi" and parsed.prompt_token_ids is None
    assert not parsed.stream and not parsed.exclude_input_in_output  # as vllm_backend: one response
    assert parsed.params.max_tokens == 16 and parsed.params.greedy
    parsed = parse_request({
        "text_input": text("hi"), "max_tokens": np.array([5], np.int32), "temperature": np.array([0.5], np.float32),
        "top_k": np.array([3], np.int32), "top_p": np.array([0.9], np.float32), "seed": np.array([7], np.int64),
        "stop": np.array([b"a", b"bc"], dtype=np.object_), "stop_token_ids": np.array([9], np.int32),
        "ignore_eos": np.array([True]), "stream": np.array([False]), "exclude_input_in_output": np.array([True]),
    })
    p = parsed.params
    assert (p.max_tokens, p.top_k, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (5, 3, 7, ["a", "bc"], [9], True)
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert not parsed.stream and parsed.exclude_input_in_output


def test_sampling_parameters_json_with_string_numbers_and_explicit_override():
    parsed = parse_request({"text_input": text("hi"),
                            "sampling_parameters": text('{"max_tokens": "32", "temperature": 0.7, "ignore_eos": "true"}'),
                            "max_tokens": np.array([4], np.int32)})
    assert parsed.params.max_tokens == 4 and parsed.params.temperature == 0.7 and parsed.params.ignore_eos


def test_penalties_min_tokens_and_logprob_flags():
    parsed = parse_request({"text_input": text("hi"), "min_tokens": np.array([3], np.int32),
                            "repetition_penalty": np.array([1.5], np.float32),
                            "presence_penalty": np.array([-0.5], np.float32),
                            "frequency_penalty": np.array([0.25], np.float32)})
    p = parsed.params
    assert (p.min_tokens, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (3, 1.5, -0.5, 0.25)
    assert p.logprobs is None and not parsed.return_logprobs and not parsed.return_cumulative_logprob
    # vLLM backend clients: N in sampling_parameters (numbers as strings too), the outputs asked for by flags.
    parsed = parse_request({"text_input": text("hi"), "return_logprobs": np.array([True]),
                            "sampling_parameters": text('{"logprobs": "5", "min_tokens": "2"}')})
    assert parsed.params.logprobs == 5 and parsed.params.min_tokens == 2 and parsed.return_logprobs
    parsed = parse_request({"text_input": text("hi"), "return_cumulative_logprob": np.array([True])})
    assert parsed.params.logprobs == 0 and parsed.return_cumulative_logprob and not parsed.return_logprobs
    parsed = parse_request({"text_input": text("hi"), "sampling_parameters": text('{"logprobs": 2}')})
    assert parsed.params.logprobs == 2 and parsed.return_logprobs


@pytest.mark.parametrize("model", ["flover", "flover_window", "flover_instances"])
def test_no_config_declares_inputs_or_outputs(model):
    """The model declares them (auto_complete_config, from the schema): a config.pbtxt that listed some would be
    a second declaration to keep in step (test_triton checks what the server then reports)."""
    config = (PROJECT_ROOT / "model_repository" / model / "config.pbtxt").read_text()
    assert not re.search(r"^\s*(input|output)\s*\[", config, re.MULTILINE)


def test_input_ids_prompt():
    parsed = parse_request({"input_ids": np.array([[5, 6, 7]], np.int32)})
    assert parsed.prompt is None and parsed.prompt_token_ids == [5, 6, 7]


@pytest.mark.parametrize("inputs, field", [
    ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, "text_input"),
    ({"text_input": text("x" * 1001)}, "text_input"),
    ({"input_ids": np.zeros(100, np.int32)}, "input_ids"),
    ({"text_input": text("x"), "stop": np.array([b"s"] * 17, dtype=np.object_)}, "stop"),
    ({"text_input": text("x"), "stop": np.array([b"s" * 1025], dtype=np.object_)}, "stop"),
    ({"text_input": text("x"), "stop": np.array([b"s" * 257], dtype=np.object_)}, "stop"),
    ({"text_input": text("x"), "stop_token_ids": np.zeros(257, np.int32)}, "stop_token_ids"),
    ({"text_input": text("x"), "stop_token_ids": np.array([-1], np.int32)}, "stop_token_ids"),
    ({"text_input": text("x"), "sampling_parameters": text('{"stop_token_ids": ' + str(list(range(300))) + "}")},
     "stop_token_ids"),
    ({"text_input": text("x"), "sampling_parameters": text('{"stop": {"a": 1}}')}, "stop"),
    ({"text_input": text("x"), "sampling_parameters": text('{"stop_token_ids": [true]}')}, "stop_token_ids"),
    ({"text_input": text("x"), "sampling_parameters": text("[" * 100_000)}, "sampling_parameters"),
    ({"text_input": text("x"), "sampling_parameters": text("[" * 10_000 + "]" * 10_000)}, "sampling_parameters"),
    ({"text_input": text("x"), "sampling_parameters": text('{"temperature": "nan"}')}, "temperature"),
    ({"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}, "text_input"),
    ({"text_input": text("x"), "max_tokens": np.array([-1], np.int32)}, "max_tokens"),
    ({"text_input": text("x"), "max_tokens": np.array([1.5], np.float32)}, "max_tokens"),
    ({"text_input": text("x"), "top_p": np.array([0.0], np.float32)}, "top_p"),
    ({"text_input": text("x"), "top_p": np.array([1.2], np.float32)}, "top_p"),
    ({"text_input": text("x"), "temperature": np.array([-1.0], np.float32)}, "temperature"),
    ({"text_input": text("x"), "stream": np.array([1], np.int32)}, "stream"),
    ({"text_input": text("x"), "sampling_parameters": text("{not json")}, "sampling_parameters"),
    ({"text_input": text("x"), "sampling_parameters": text("[1, 2]")}, "sampling_parameters"),
    ({"text_input": text("x"), "sampling_parameters": text('{"bogus": 1}')}, "sampling_parameters"),
    ({"text_input": text("x"), "sampling_parameters": text('{"max_tokens": "many"}')}, "max_tokens"),
    ({"text_input": text("x"), "stop": np.array([b"\xc3"], dtype=np.object_)}, "stop"),
    ({"text_input": text("x"), "repetition_penalty": np.array([0.0], np.float32)}, "repetition_penalty"),
    ({"text_input": text("x"), "presence_penalty": np.array([2.5], np.float32)}, "presence_penalty"),
    ({"text_input": text("x"), "frequency_penalty": np.array([-3.0], np.float32)}, "frequency_penalty"),
    ({"text_input": text("x"), "min_tokens": np.array([17], np.int32)}, "min_tokens"),
    ({"text_input": text("x"), "return_logprobs": np.array([1], np.int32)}, "return_logprobs"),
    ({"text_input": text("x"), "sampling_parameters": text('{"logprobs": 21}')}, "logprobs"),
    ({"text_input": text("x"), "sampling_parameters": text('{"logprobs": "many"}')}, "logprobs"),
])
def test_bad_inputs_name_their_field(inputs, field):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(inputs)
    assert info.value.field == field


def random_array(draw, spec) -> np.ndarray:
    """Any values Triton could hand the model for this input (its dtype, any length), and some it could not."""
    size = draw(st.integers(0, 3))
    if spec.python_type is str:
        return np.array(draw(st.lists(st.binary(max_size=40), min_size=size, max_size=size)), dtype=np.object_)
    if spec.python_type is bool:
        return np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), dtype=bool)
    if spec.python_type is float:
        return np.array(draw(st.lists(st.floats(width=32), min_size=size, max_size=size)), dtype=np.float32)
    return np.array(draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=size, max_size=size)), dtype=np.int32)


@st.composite
def request_inputs(draw) -> dict:
    chosen = draw(st.lists(st.sampled_from(INPUTS), unique=True, max_size=6))
    inputs = {spec.name: random_array(draw, spec) for spec in chosen}
    if draw(st.booleans()):
        fields = st.dictionaries(st.sampled_from([*BY_NAME, "other"]),
                                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                                              lambda inner: st.lists(inner, max_size=3)), max_size=4)
        inputs["sampling_parameters"] = text(json.dumps(draw(fields)))
    return inputs


@settings(max_examples=400, deadline=None)
@given(request_inputs())
def test_any_input_parses_or_fails_naming_a_field(inputs):
    """The adapter answers a bug with 'internal error': no input may reach one."""
    try:
        parse_request(inputs)
    except InvalidRequestError as exc:
        assert exc.field in {spec.name for spec in INPUTS} | set(BY_NAME) | {"prompt"}


def test_derive_repository_overrides_parameters_and_counts(tmp_path):
    repo = derive_repository(tmp_path / "repo", models=["flover", "flover_instances"],
                             settings={"model": "builtin:tiny", "max_num_seqs": 8},
                             instance_counts={"flover_instances": 2},
                             variants={"flover_nocompact": ("flover", {"compaction": "false"})})
    assert sorted(p.name for p in repo.iterdir()) == ["flover", "flover_instances", "flover_nocompact"]
    variant = (repo / "flover_nocompact" / "config.pbtxt").read_text()
    assert 'key: "compaction" value: { string_value: "false" }' in variant and "builtin:tiny" in variant
    config = (repo / "flover" / "config.pbtxt").read_text()
    assert 'key: "model" value: { string_value: "builtin:tiny" }' in config
    assert 'key: "max_num_seqs" value: { string_value: "8" }' in config and "builtin:small" not in config
    assert "count: 2" in (repo / "flover_instances" / "config.pbtxt").read_text()
    assert 'key: "new" value: { string_value: "1" }' in set_parameter("", "new", "1")
    with pytest.raises(FileNotFoundError):
        derive_repository(tmp_path / "other", models=["missing"])


def test_request_parameters_carry_the_settings_when_no_sampling_parameters_input():
    """vllm_backend's other way: the request's own parameters (numbers as strings too); Triton's keys skipped."""
    parameters = json.dumps({"max_tokens": "5", "temperature": 0.5, "ignore_eos": True,
                             "triton_enable_empty_final_response": True, "priority": 0})
    parsed = parsing.parse_request({"text_input": text("hi")}, LIMITS, parameters)
    assert (parsed.params.max_tokens, parsed.params.temperature, parsed.params.ignore_eos) == (5, 0.5, True)
    both = parsing.parse_request({"text_input": text("hi"), "sampling_parameters": text('{"max_tokens": 3}')},
                                 LIMITS, parameters)
    assert both.params.max_tokens == 3 and both.params.temperature == 0.0  # the input wins, whole
    with pytest.raises(InvalidRequestError, match="min_p"):
        parsing.parse_request({"text_input": text("hi")}, LIMITS, '{"min_p": 0.1}')
    with pytest.raises(InvalidRequestError) as refused:
        parsing.parse_request({"text_input": text("hi")}, LIMITS, "x" * (parsing.MAX_JSON_BYTES + 1))
    assert refused.value.field == "parameters"
