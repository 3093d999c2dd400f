"""Structured output requests (vLLM's guided_json / guided_regex / guided_choice), checked and bounded at the door.

Pure Python: what a request asks for, in one canonical text that the grammar compiler (flover_backend.sampling.grammar)
turns into a token mask, and that also keys its cache. Every input is bounded here, before any compiling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from flover_backend.errors import InvalidRequestError

# A schema's compact JSON text; ample for real response formats. Compiling grows with it (~12 ms for a
# five-field schema on the 2-core AMD EPYC, `python -m benchmarks.structured_output`) and runs on the submitting thread, never on the loop.
MAX_SCHEMA_BYTES = 16 * 1024
# Nesting of the schema document: compile time grows with depth (200 nested arrays took ~0.9 s on the AMD EPYC).
MAX_SCHEMA_DEPTH = 32
MAX_REGEX_CHARS = 1024
MAX_CHOICES = 64
MAX_CHOICE_CHARS = 256
# What OpenAI's response_format {"type": "json_object"} means: any JSON object.
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

GuideKind = Literal["json", "regex", "choice"]


@dataclass(frozen=True)
class GuidedDecoding:
    """One request's constraint: its kind, its canonical text (compact schema, regex, or the JSON list of
    choices) and the request key it came from, which errors name."""

    kind: GuideKind
    source: str
    field: str


def guided_decoding(guided_json: Any = None, guided_regex: Any = None,
                    guided_choice: Any = None) -> GuidedDecoding | None:
    """The constraint a request's guided_* values ask for (at most one of them), bounded; None if none."""
    given = [name for name, value in (("guided_json", guided_json), ("guided_regex", guided_regex),
                                      ("guided_choice", guided_choice)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(given[1], f"give one of guided_json, guided_regex, guided_choice, not {given}")
    if guided_json is not None:
        return GuidedDecoding("json", _schema_text(guided_json), "guided_json")
    if guided_regex is not None:
        if not isinstance(guided_regex, str) or not 0 < len(guided_regex) <= MAX_REGEX_CHARS:
            raise InvalidRequestError("guided_regex", f"must be a non-empty string of at most {MAX_REGEX_CHARS} "
                                                      "characters")
        return GuidedDecoding("regex", guided_regex, "guided_regex")
    return GuidedDecoding("choice", _choices_text(guided_choice), "guided_choice")


def _schema_text(schema: Any) -> str:
    """A JSON schema (a JSON object, or its text) as compact JSON text, its size and depth bounded."""
    if isinstance(schema, str):
        # len(str) <= UTF-8 bytes: the parse below never sees more than the bound.
        if len(schema) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError("guided_json", f"the schema is longer than {MAX_SCHEMA_BYTES} bytes")
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError("guided_json", f"the schema is not valid JSON: {exc.msg} at char "
                                                     f"{exc.pos}") from None
        except RecursionError:
            raise InvalidRequestError("guided_json", "the schema is nested too deeply") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("guided_json", f"the schema must be a JSON object, got {type(schema).__name__}")
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError("guided_json", f"the schema is nested {depth} levels deep; at most "
                                                 f"{MAX_SCHEMA_DEPTH}")
    # Key order is kept: the grammar emits an object's properties in the order the schema lists them.
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise InvalidRequestError("guided_json", f"the schema is longer than {MAX_SCHEMA_BYTES} bytes")
    return text


def _choices_text(choices: Any) -> str:
    """The choices, bounded, as a JSON list (the canonical text of a choice constraint)."""
    if not isinstance(choices, list) or not 0 < len(choices) <= MAX_CHOICES:
        raise InvalidRequestError("guided_choice", f"must be a list of 1 to {MAX_CHOICES} strings")
    if not all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in choices):
        raise InvalidRequestError("guided_choice", f"each choice must be a non-empty string of at most "
                                                   f"{MAX_CHOICE_CHARS} characters")
    return json.dumps(choices, ensure_ascii=False)


def _depth(value: Any) -> int:
    """How deeply a parsed JSON value nests objects and arrays (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest
