"""Triton request inputs -> one engine request, with errors that name the offending input. No pb_utils here.

Every input is bounded before work is done on it: sizes are checked on the arrays as they arrive, before
any string is decoded, list converted or JSON parsed. Triton has already checked each input's data type
and shape against config.pbtxt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from flover_backend.admission import AdmissionLimits, check_admission
from flover_backend.errors import InvalidRequestError
from flover_backend.frontends.triton.schema import JSON_INPUT, RESPONSE_FLAGS, SAMPLING_INPUTS, TensorSpec
from flover_backend.param_table import BY_NAME, PARAMS
from flover_backend.sampling.params import SamplingParams

MAX_JSON_BYTES = 64 * 1024  # sampling_parameters: far more than every field needs
# Clients of Triton's vLLM backend send numbers as strings ({"max_tokens": "64"}): the JSON's scalars convert.
JSON_SCALARS = {p.name: p.kind for p in PARAMS if not p.is_list and p.kind in (int, float, bool)}
# Request parameters that are Triton's own (its parameters extension reserves them, and every "triton_*" key,
# e.g. the gRPC client's triton_enable_empty_final_response): never sampling settings.
TRITON_RESERVED = {"sequence_id", "priority", "timeout", "sequence_start", "sequence_end", "headers"}


@dataclass
class ParsedRequest:
    """Everything the adapter needs to serve one Triton request."""

    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool
    return_logprobs: bool = False  # send the `logprobs` output
    return_cumulative_logprob: bool = False  # send the `cumulative_logprob` output
    # vllm_backend's flags: None (absent) sends finish_reason and the total counts on the final response only.
    return_finish_reason: bool | None = None
    return_num_input_tokens: bool | None = None
    return_num_output_tokens: bool | None = None


def parse_request(inputs: dict[str, np.ndarray], limits: AdmissionLimits, parameters: str = "") -> ParsedRequest:
    """Validate the named input arrays of one request (as `as_numpy()` gives them), and its Triton request
    `parameters` (JSON): without a `sampling_parameters` input, vllm_backend takes the settings from there."""
    prompt = None
    if "text_input" in inputs:
        prompt = _text(inputs, "text_input", limits.prompt_byte_limit)
    token_ids = None
    if "input_ids" in inputs:
        ids = _flat(inputs, "input_ids")
        check_admission(limits, num_prompt_tokens=ids.size, prompt_field="input_ids")
        token_ids = [int(t) for t in ids]
    values: dict[str, Any] = {}
    if JSON_INPUT.name in inputs:
        values |= _sampling_json(_text(inputs, JSON_INPUT.name, MAX_JSON_BYTES))
    elif parameters not in ("", "{}"):
        if len(parameters) > MAX_JSON_BYTES:
            raise InvalidRequestError("parameters", f"longer than {MAX_JSON_BYTES} characters")
        values |= {key: value for key, value in _sampling_json(parameters, "parameters").items()
                   if key not in TRITON_RESERVED and not key.startswith("triton_")}
    for spec in SAMPLING_INPUTS:
        if spec.name in inputs:
            values[spec.name] = _list(inputs, spec) if spec.is_list else _scalar(inputs, spec.name, spec.python_type)
    flags = {name: _scalar(inputs, name, bool) for name in RESPONSE_FLAGS if name in inputs}
    # vLLM's `logprobs` in sampling_parameters asks for them too; either flag alone computes the chosen tokens'.
    flags["return_logprobs"] = flags.get("return_logprobs", False) or values.get("logprobs") is not None
    flags.setdefault("return_cumulative_logprob", False)
    if (flags["return_logprobs"] or flags["return_cumulative_logprob"]) and values.get("logprobs") is None:
        values["logprobs"] = 0
    # As vllm_backend: no `stream` input means one response; the whole text then starts with the prompt.
    flags.setdefault("stream", False)
    flags.setdefault("exclude_input_in_output", False)
    params = SamplingParams.from_dict(values)
    if token_ids is not None:  # a text prompt's tokens are counted by the engine, which tokenizes it
        check_admission(limits, num_prompt_tokens=len(token_ids), max_tokens=params.max_tokens, prompt_field="input_ids")
    return ParsedRequest(prompt, token_ids, params, **flags)


def _flat(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.asarray(inputs[name]).reshape(-1)


def _text(inputs: dict[str, np.ndarray], name: str, max_bytes: int) -> str:
    values = _flat(inputs, name)
    if values.size != 1:
        raise InvalidRequestError(name, f"expected exactly one string, got {values.size}")
    return _decode(values[0], name, max_bytes)


def _list(inputs: dict[str, np.ndarray], spec: TensorSpec) -> list:
    values = _flat(inputs, spec.name)
    param = BY_NAME[spec.name]
    if values.size > param.max_items:
        raise InvalidRequestError(spec.name, f"at most {param.max_items} values, got {values.size}")
    if spec.python_type is str:  # bytes bounded before decoding: each character is at most 4 in UTF-8
        return [_decode(value, spec.name, 4 * param.max_chars) for value in values]
    return [int(value) for value in values]


def _decode(value: Any, name: str, max_bytes: int) -> str:
    if not isinstance(value, (bytes, np.bytes_)):
        raise InvalidRequestError(name, f"must be a UTF-8 string, got {type(value).__name__}")
    if len(value) > max_bytes:
        raise InvalidRequestError(name, f"longer than {max_bytes} bytes ({len(value)})")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _scalar(inputs: dict[str, np.ndarray], name: str, kind: type) -> Any:
    values = _flat(inputs, name)
    if values.size != 1:
        raise InvalidRequestError(name, f"expected one value, got {values.size}")
    value = values[0]
    if kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidRequestError(name, f"must be a boolean, got {value!r}")
        return bool(value)
    if kind is int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise InvalidRequestError(name, f"must be an integer, got {value!r}")
        return int(value)
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    return float(value)


def _sampling_json(text: str, name: str = JSON_INPUT.name) -> dict[str, Any]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(name, f"is not valid JSON: {exc.msg} at char {exc.pos}") from None
    except RecursionError:
        raise InvalidRequestError(name, "is nested too deeply") from None
    if not isinstance(values, dict):
        raise InvalidRequestError(name, "must be a JSON object")
    return {key: _from_string(key, JSON_SCALARS[key], value)
            if isinstance(value, str) and JSON_SCALARS.get(key, str) is not str else value
            for key, value in values.items()}


def _from_string(name: str, kind: type, text: str) -> Any:
    lowered = text.strip().lower()
    try:
        if kind is bool:
            if lowered not in ("true", "false"):
                raise ValueError(text)
            return lowered == "true"
        return kind(lowered)
    except ValueError:
        raise InvalidRequestError(name, f"must be a {kind.__name__}, got {text!r}") from None
