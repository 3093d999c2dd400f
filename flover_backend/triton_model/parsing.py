"""Triton request inputs -> one engine request, with errors that name the offending input. No pb_utils here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from flover_backend.errors import InvalidRequestError
from flover_backend.sampling_params import SamplingParams

# Scalar inputs that map one to one onto SamplingParams fields, with the Python type each must hold.
SCALAR_PARAMS = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
                 "ignore_eos": bool}
LIST_PARAMS = {"stop": str, "stop_token_ids": int}
DEFAULT_MAX_TOKENS = 16


@dataclass
class ParsedRequest:
    """Everything the adapter needs to serve one Triton request."""

    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool


def parse_request(inputs: dict[str, np.ndarray]) -> ParsedRequest:
    """Validate the named input arrays of one request (as `as_numpy()` gives them)."""
    prompt = _text(inputs, "text_input") if "text_input" in inputs else None
    token_ids = None
    if "input_ids" in inputs:
        token_ids = [int(t) for t in _flat(inputs, "input_ids")]
    if prompt is None and token_ids is None:
        raise InvalidRequestError("text_input", "a prompt is required (text_input or input_ids)")
    if prompt is not None and token_ids is not None:
        raise InvalidRequestError("input_ids", "give text_input or input_ids, not both")
    values: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
    if "sampling_parameters" in inputs:
        values |= _sampling_json(_text(inputs, "sampling_parameters"))
    for name, kind in SCALAR_PARAMS.items():
        if name in inputs:
            values[name] = _scalar(inputs, name, kind)
    for name, kind in LIST_PARAMS.items():
        if name in inputs:
            values[name] = [_decode(v, name) if kind is str else int(v) for v in _flat(inputs, name)]
    stream = _scalar(inputs, "stream", bool) if "stream" in inputs else True
    exclude = _scalar(inputs, "exclude_input_in_output", bool) if "exclude_input_in_output" in inputs else False
    return ParsedRequest(prompt, token_ids, SamplingParams.from_dict(values), stream, exclude)


def _flat(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.asarray(inputs[name]).reshape(-1)


def _text(inputs: dict[str, np.ndarray], name: str) -> str:
    values = _flat(inputs, name)
    if values.size != 1:
        raise InvalidRequestError(name, f"expected exactly one string, got {values.size}")
    return _decode(values[0], name)


def _decode(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
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
        raise InvalidRequestError("sampling_parameters", f"is not valid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(values, dict):
        raise InvalidRequestError("sampling_parameters", "must be a JSON object")
    # Clients of Triton's vLLM backend send numbers as strings ({"max_tokens": "64"}): accept those too.
    return {key: _from_string(key, value) if isinstance(value, str) and key in SCALAR_PARAMS else value
            for key, value in values.items()}


def _from_string(name: str, text: str) -> Any:
    kind = SCALAR_PARAMS[name]
    lowered = text.strip().lower()
    try:
        if kind is bool:
            if lowered not in ("true", "false"):
                raise ValueError(text)
            return lowered == "true"
        return kind(lowered)
    except ValueError:
        raise InvalidRequestError(name, f"must be a {kind.__name__}, got {text!r}") from None
