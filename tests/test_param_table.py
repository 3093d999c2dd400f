"""The parameter table: every interface's fields, bounds and defaults are the table's, and a new row is enough."""

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from flover_backend.admission import AdmissionLimits, check_admission
from flover_backend.errors import InvalidRequestError
from flover_backend.frontends.openai.errors import TRITON_FIELDS
from flover_backend.frontends.openai.protocol import ChatCompletionRequest, CompletionRequest
from flover_backend.frontends.triton.parsing import parse_request
from flover_backend.frontends.triton.schema import SAMPLING_INPUTS
from flover_backend.param_flags import add_sampling_arguments, sampling_values
from flover_backend.param_table import ENGINE_DEFAULT, PARAMS
from flover_backend.sampling.params import SamplingParams
from flover_backend.triton_env import PROJECT_ROOT

LIMITS = AdmissionLimits(max_model_len=100, max_prompt_bytes=1000)
BOUNDED = [p for p in PARAMS if p.low is not None or p.high is not None]


def edges(param) -> tuple[list, list]:
    """Values just inside and just outside the parameter's bounds."""
    step = 1 if param.kind is int else 1e-3
    inside, outside = [], []
    if param.low is not None:
        (outside if param.low_open else inside).append(param.low)
        inside.append(param.low + step)
        outside.append(param.low - step)
    if param.high is not None:
        (outside if param.high_open else inside).append(param.high)
        inside.append(param.high - step)
        outside.append(param.high + step)
    return [v for v in inside if param.low is None or v >= param.low], outside


def as_kind(param, value):
    return int(value) if param.kind is int else float(value)


def test_sampling_params_has_one_field_per_row_with_its_default():
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    assert list(fields) == [p.name for p in PARAMS]
    made = SamplingParams()
    for param in PARAMS:
        assert getattr(made, param.name) == param.default, param.name


@pytest.mark.parametrize("param", BOUNDED, ids=lambda p: p.name)
def test_engine_triton_json_and_openai_take_the_same_bounds(param):
    """A value inside is taken by all three doors, one outside is refused by all three, naming the field."""
    inside, outside = edges(param)
    others = {"max_tokens": 2**20} if param.name == "min_tokens" else {}  # min_tokens <= max_tokens
    for value in inside:
        value = as_kind(param, value)
        if param.name in ("n", "best_of"):
            continue  # only 1: checked apart below
        one = [value] if param.is_list else value
        assert getattr(SamplingParams(**{param.name: one} | others), param.name) == one
        parsed = parse_request({"text_input": _text("x"), "sampling_parameters": _text(json.dumps(
            {param.name: one} | others))}, LIMITS)
        assert getattr(parsed.params, param.name) == one
        if param.openai:
            body = CompletionRequest.model_validate({"model": "m", "prompt": "x", param.openai: one})
            sent = json.loads(body.triton_fields(body.max_tokens or 16)["sampling_parameters"])
            assert sent[param.name] == one
    for value in outside:
        value = as_kind(param, value)
        one = [value] if param.is_list else value
        with pytest.raises(InvalidRequestError) as refused:
            SamplingParams(**{param.name: one})
        assert refused.value.field == param.name
        with pytest.raises(InvalidRequestError) as refused:
            parse_request({"text_input": _text("x"), "sampling_parameters": _text(json.dumps({param.name: one}))},
                          LIMITS)
        assert refused.value.field == param.name
        if param.openai:  # chat: completions also take max_tokens 0, with echo (checked apart)
            with pytest.raises(ValidationError) as invalid:
                ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                      param.openai: one})
            assert invalid.value.errors()[0]["loc"][0] == param.openai


def test_one_only_values():
    assert SamplingParams(n=1, best_of=1).n == 1
    for name, value in (("n", 2), ("best_of", 2)):
        with pytest.raises(InvalidRequestError, match=name):
            SamplingParams(**{name: value})


def test_triton_tensor_inputs_are_the_rows_that_name_a_triton_type():
    assert [(s.name, s.data_type, s.is_list) for s in SAMPLING_INPUTS] == [
        (p.name, p.triton, p.is_list) for p in PARAMS if p.triton]


def test_openai_defaults_side_by_side_with_the_engines():
    """Absent, a field means the engine's default, except where the table says OpenAI's differs (temperature 1)."""
    differ = {p.name: p.openai_default for p in PARAMS if p.openai_default not in (ENGINE_DEFAULT, None)}
    assert differ == {"temperature": 1.0}
    assert SamplingParams().temperature == 0.0
    for model, body in ((CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, {"messages": [
            {"role": "user", "content": "x"}]})):
        sent = json.loads(model.model_validate({"model": "m"} | body).triton_fields(7)["sampling_parameters"])
        assert sent == {"temperature": 1.0, "max_tokens": 7}
    assert {p.openai for p in PARAMS if p.openai} <= set(CompletionRequest.model_fields)
    assert all(TRITON_FIELDS[p.name] == p.openai for p in PARAMS if p.openai)


def test_cli_flags_are_the_rows_marked_cli():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args(["--temperature", "0.5", "--stop", "a", "--stop", "b", "--ignore-eos"])
    given = sampling_values(args)
    assert given == {"temperature": 0.5, "stop": ["a", "b"], "ignore_eos": True}
    assert {a.dest for a in parser._actions} - {"help"} == {p.name for p in PARAMS if p.cli}


# A parameter the engine does not have, added to the table alone: every derived interface must carry it.
NEW_ROW = """
import json, argparse
import numpy as np
import flover_backend.param_table as table
new = table.Param("typical_p", float, 1.0, "a new row", low=0.0, high=1.0, low_open=True, triton="TYPE_FP32",
                  openai="typical_p")
table.PARAMS = (*table.PARAMS, new)
table.BY_NAME[new.name] = new
from flover_backend.admission import AdmissionLimits
from flover_backend.errors import InvalidRequestError
from flover_backend.param_flags import add_sampling_arguments
from flover_backend.frontends.openai.errors import TRITON_FIELDS
from flover_backend.frontends.openai.protocol import CompletionRequest
from flover_backend.sampling.params import SamplingParams
from flover_backend.frontends.triton.parsing import parse_request
from flover_backend.frontends.triton.schema import INPUTS
assert SamplingParams().typical_p == 1.0 and SamplingParams(typical_p=0.5).typical_p == 0.5
try:
    SamplingParams(typical_p=0.0)
    raise SystemExit("the engine took a value out of bounds")
except InvalidRequestError as exc:
    assert exc.field == "typical_p"
assert ("typical_p", "TYPE_FP32", (1,)) in {(s.name, s.data_type, s.dims) for s in INPUTS}
limits = AdmissionLimits(100)
text = lambda s: np.array([s.encode()], dtype=np.object_)
assert parse_request({"text_input": text("x"), "typical_p": np.array([0.5], np.float32)}, limits).params.typical_p \
    == 0.5
assert parse_request({"text_input": text("x"), "sampling_parameters": text('{"typical_p": "0.25"}')},
                     limits).params.typical_p == 0.25
body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "typical_p": 0.5})
assert json.loads(body.triton_fields(4)["sampling_parameters"])["typical_p"] == 0.5
assert TRITON_FIELDS["typical_p"] == "typical_p"
parser = argparse.ArgumentParser()
add_sampling_arguments(parser)
assert parser.parse_args(["--typical-p", "0.5"]).typical_p == 0.5
print("every interface carries typical_p")
"""


def test_a_new_row_reaches_every_interface():
    """Adding a parameter the sampler already supports touches the table only: SamplingParams, the Triton
    tensor and JSON inputs, the OpenAI field and its mapping, error mapping and the CLI all carry it."""
    done = subprocess.run([sys.executable, "-c", NEW_ROW], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "every interface carries typical_p" in done.stdout


@pytest.mark.parametrize("counts, field", [
    ({"num_prompt_bytes": 1001}, "prompt"),
    ({"num_prompt_tokens": 0}, "prompt"),
    ({"num_prompt_tokens": 100}, "prompt"),
    ({"num_prompt_tokens": 99, "max_tokens": 2}, "max_tokens"),
])
def test_admission_refuses_naming_the_field(counts, field):
    with pytest.raises(InvalidRequestError) as refused:
        check_admission(LIMITS, **counts)
    assert refused.value.field == field


def test_admission_takes_what_fits():
    check_admission(LIMITS, num_prompt_bytes=1000, num_prompt_tokens=99, max_tokens=1)
    assert AdmissionLimits(max_model_len=10).prompt_byte_limit == 320  # 32 bytes a token unless set


def _text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)
