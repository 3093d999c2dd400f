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

from flover_backend.errors import InvalidRequestError
from flover_backend.sampling_params import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from flover_backend.triton_model.schema import JSON_INPUT, SAMPLING_INPUTS, TensorSpec

MAX_JSON_BYTES = 64 * 1024  # sampling_parameters: far more than every field needs
# Bytes a stop string may take in UTF-8: each character is at most 4.
MAX_LIST_LENGTHS = {"stop": MAX_STOP_STRINGS, "stop_token_ids": MAX_STOP_TOKEN_IDS}
MAX_STRING_BYTES = {"stop": 4 * MAX_STOP_STRING_CHARS, JSON_INPUT.name: MAX_JSON_BYTES}
JSON_ONLY_SCALARS = {"logprobs": int, "prompt_logprobs": int}  # SamplingParams fields that sampling_parameters alone sets (see schema)


@dataclass(frozen=True)
class RequestLimits:
    """The bounds that depend on the served engine's settings."""

    max_prompt_bytes: int
    max_prompt_tokens: int


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


def parse_request(inputs: dict[str, np.ndarray], limits: RequestLimits) -> ParsedRequest:
    """Validate the named input arrays of one request (as `as_numpy()` gives them)."""
    prompt = None
    if "text_input" in inputs:
        prompt = _text(inputs, "text_input", limits.max_prompt_bytes)
    token_ids = None
    if "input_ids" in inputs:
        ids = _flat(inputs, "input_ids")
        if ids.size >= limits.max_prompt_tokens:
            raise InvalidRequestError("input_ids", f"{ids.size} tokens leave no room in max_model_len "
                                                   f"{limits.max_prompt_tokens}")
        token_ids = [int(t) for t in ids]
    values: dict[str, Any] = {}
    if JSON_INPUT.name in inputs:
        values |= _sampling_json(_text(inputs, JSON_INPUT.name, MAX_JSON_BYTES))
    for spec in SAMPLING_INPUTS:
        if spec.name in inputs:
            values[spec.name] = _list(inputs, spec) if spec.is_list else _scalar(inputs, spec.name, spec.python_type)
    stream, exclude, return_logprobs, return_cumulative = (
        _scalar(inputs, name, bool) if name in inputs else default
        for name, default in (("stream", True), ("exclude_input_in_output", False), ("return_logprobs", False),
                              ("return_cumulative_logprob", False)))
    # vLLM's `logprobs` in sampling_parameters asks for them too; either flag alone computes the chosen tokens'.
    return_logprobs = return_logprobs or values.get("logprobs") is not None
    if (return_logprobs or return_cumulative) and values.get("logprobs") is None:
        values["logprobs"] = 0
    return ParsedRequest(prompt, token_ids, SamplingParams.from_dict(values), stream, exclude, return_logprobs,
                         return_cumulative)


def _flat(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.asarray(inputs[name]).reshape(-1)


def _text(inputs: dict[str, np.ndarray], name: str, max_bytes: int) -> str:
    values = _flat(inputs, name)
    if values.size != 1:
        raise InvalidRequestError(name, f"expected exactly one string, got {values.size}")
    return _decode(values[0], name, max_bytes)


def _list(inputs: dict[str, np.ndarray], spec: TensorSpec) -> list:
    values = _flat(inputs, spec.name)
    limit = MAX_LIST_LENGTHS[spec.name]
    if values.size > limit:
        raise InvalidRequestError(spec.name, f"at most {limit} values, got {values.size}")
    if spec.python_type is str:
        return [_decode(value, spec.name, MAX_STRING_BYTES[spec.name]) for value in values]
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


def _sampling_json(text: str) -> dict[str, Any]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(JSON_INPUT.name, f"is not valid JSON: {exc.msg} at char {exc.pos}") from None
    except RecursionError:
        raise InvalidRequestError(JSON_INPUT.name, "is nested too deeply") from None
    if not isinstance(values, dict):
        raise InvalidRequestError(JSON_INPUT.name, "must be a JSON object")
    # Clients of Triton's vLLM backend send numbers as strings ({"max_tokens": "64"}): accept those too.
    scalars = {spec.name: spec.python_type for spec in SAMPLING_INPUTS if not spec.is_list} | JSON_ONLY_SCALARS
    return {key: _from_string(key, scalars[key], value) if isinstance(value, str) and key in scalars else value
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
