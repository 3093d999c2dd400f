"""Every request parameter, declared once: name, type, default, bounds, and its Triton and OpenAI names.

Everything else is derived from PARAMS: `SamplingParams` (its fields and their validation), the flover models'
Triton inputs (`triton_model.schema`, declared to Triton by `auto_complete_config`), the keys
`sampling_parameters` takes, the OpenAI request fields and the map back from engine errors to them, and the
`flover generate` flags. A parameter the sampler already supports is added here and nowhere else.

Names: the engine's name is vLLM's `SamplingParams` name, and the key of vllm_backend's `sampling_parameters`
JSON. `triton` is the Triton tensor input's data type (the tensor bears the same name; None: JSON only, as
vllm_backend takes every setting). `openai` is the request body's field name (None: not in OpenAI's bodies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flover_backend.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # longer ones would hold back that much streamed text, waiting to rule them out
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs and OpenAI's top_logprobs
MAX_TOKENS = 1 << 20  # past any max_model_len; admission checks the real room (admission.py)
MAX_TOKEN_ID = 2**31 - 1  # Triton carries ids as INT32
ENGINE_DEFAULT = object()  # Param.openai_default: OpenAI's API means the engine's default too

_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", object: "JSON"}


@dataclass(frozen=True)
class Param:
    """One request parameter and how each interface names and bounds it."""

    name: str
    kind: type  # int, float, bool or str: of the value, or of each item of a list; object: any JSON, checked
    # by its own validator (structured output's keys: sampling.structured_output bounds them together)
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ... rather than [low, ...
    high_open: bool = False
    nullable: bool = False  # None is allowed and means "off"
    max_items: int | None = None  # set: a list of at most this many values
    max_chars: int | None = None  # each string's characters (str items)
    triton: str | None = None  # Triton data type of the tensor input of the same name; None: JSON only
    openai: str | None = None  # OpenAI request field name; None: not offered there
    openai_default: Any = ENGINE_DEFAULT  # what an absent OpenAI field means, where it differs from `default`
    why: str = ""  # why the OpenAI default differs
    cli: bool = True  # a `flover generate` flag

    @property
    def is_list(self) -> bool:
        """Whether the value is a list of `kind` values."""
        return self.max_items is not None

    @property
    def bounds(self) -> str:
        """The bounds in interval notation, e.g. "(0, 1]"; "" when unbounded."""
        if self.low is None and self.high is None:
            return ""
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}" if self.high < 2**20 else _power(self.high)
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any) -> None:
        """Raise InvalidRequestError naming this parameter unless `value` is of its type and in its bounds."""
        if value is None and self.nullable:
            return
        if not self.is_list:
            if not self._fits(value):
                raise InvalidRequestError(self.name, f"must be {self.describe()}, got {value!r}")
            return
        if not isinstance(value, list) or len(value) > self.max_items:
            raise InvalidRequestError(self.name, f"must be a list of at most {self.max_items} values")
        bad = [item for item in value if not self._fits(item)]
        if bad:
            raise InvalidRequestError(self.name, f"items must each be {self.describe()}, got {bad[0]!r}")

    def describe(self) -> str:
        """What a valid value (or list item) is, in words: "a number in [0, 2]"."""
        what = _KIND_NAMES[self.kind]
        if self.max_chars is not None:
            return f"a non-empty string of at most {self.max_chars} characters"
        return f"{what} in {self.bounds}" if self.bounds else what

    def _fits(self, value: Any) -> bool:
        if self.kind is object:
            return True
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and 0 < len(value) <= (self.max_chars or math.inf)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok


def _power(value: float) -> str:
    return f"2**{int(math.log2(value))}" if 2 ** int(math.log2(value)) == value else str(int(value))


PARAMS = (
    Param("max_tokens", int, 16, "tokens to generate at most", low=1, high=MAX_TOKENS, triton="TYPE_INT32",
          openai="max_tokens", openai_default=None,
          why="OpenAI: 16 on /v1/completions, the room left in max_model_len on chat (the front decides)"),
    # Decided once: OpenAI's [0, 2] for every interface. Past 2 the distribution is close to uniform, and the
    # engine took [0, 100] before while the OpenAI front refused past 2: one request got two answers.
    Param("temperature", float, 0.0, "0 (or below 1e-5) is greedy", low=0.0, high=2.0, triton="TYPE_FP32",
          openai="temperature", openai_default=1.0,
          why="OpenAI samples at 1 by default; the engine (vLLM's Triton clients, benchmarks) is greedy"),
    Param("top_k", int, 0, "keep the k most likely tokens; 0 keeps all", low=0, high=MAX_TOKENS, triton="TYPE_INT32",
          openai="top_k"),
    Param("top_p", float, 1.0, "keep the fewest most likely tokens reaching this mass", low=0.0, high=1.0,
          low_open=True, triton="TYPE_FP32", openai="top_p"),
    Param("seed", int, None, "tokens depend on the seed and logits alone", low=0, high=2**63, high_open=True,
          nullable=True, triton="TYPE_INT64", openai="seed"),
    Param("stop", str, [], "strings that end the request (not in the output)", max_items=MAX_STOP_STRINGS,
          max_chars=MAX_STOP_STRING_CHARS, triton="TYPE_STRING", openai="stop"),
    Param("stop_token_ids", int, [], "token ids that end the request", low=0, high=MAX_TOKEN_ID,
          max_items=MAX_STOP_TOKEN_IDS, triton="TYPE_INT32", openai="stop_token_ids"),
    Param("ignore_eos", bool, False, "run on past eos", triton="TYPE_BOOL", openai="ignore_eos"),
    Param("min_tokens", int, 0, "nothing ends the request before this many tokens", low=0, high=MAX_TOKENS,
          triton="TYPE_INT32", openai="min_tokens"),
    Param("repetition_penalty", float, 1.0, "HF / vLLM's; 1 disables it", low=0.0, high=2.0, low_open=True,
          triton="TYPE_FP32", openai="repetition_penalty"),
    Param("presence_penalty", float, 0.0, "OpenAI's", low=-2.0, high=2.0, triton="TYPE_FP32",
          openai="presence_penalty"),
    Param("frequency_penalty", float, 0.0, "OpenAI's", low=-2.0, high=2.0, triton="TYPE_FP32",
          openai="frequency_penalty"),
    # A tensor named logprobs would shadow the output of that name (as in vllm_backend): JSON only. The OpenAI
    # endpoints spell it differently (completions `logprobs`, chat `logprobs` + `top_logprobs`): protocol maps it.
    Param("logprobs", int, None, "the chosen token's logprob and this many alternatives'", low=0, high=MAX_LOGPROBS,
          nullable=True, cli=False),
    Param("prompt_logprobs", int, None, "each prompt token's logprob after the first, and this many alternatives'", low=0, high=MAX_LOGPROBS,
          nullable=True, cli=False),
    Param("skip_special_tokens", bool, True, "leave special tokens out of the text", openai="skip_special_tokens"),
    Param("spaces_between_special_tokens", bool, True, "vLLM's; the tokenizer's decoder places them",
          openai="spaces_between_special_tokens", cli=False),
    Param("include_stop_str_in_output", bool, False, "keep the stop string that ended the text",
          openai="include_stop_str_in_output"),
    Param("detokenize", bool, True, "false: token ids only, no text (no stop strings then)", cli=False),
    Param("n", int, 1, "completions per prompt: one", low=1, high=1, openai="n", cli=False),
    Param("best_of", int, None, "candidates per prompt: one", low=1, high=1, nullable=True, openai="best_of",
          cli=False),
    # Structured output (vLLM's keys; OpenAI's response_format becomes one of them in the front). At most one.
    Param("guided_json", object, None, "a JSON schema (object or text): the output is compact JSON valid under it",
          nullable=True, cli=False),
    Param("guided_regex", object, None, "a regular expression the output matches", nullable=True, cli=False),
    Param("guided_choice", object, None, "a list of strings: the output is one of them", nullable=True, cli=False),
)
BY_NAME = {param.name: param for param in PARAMS}
