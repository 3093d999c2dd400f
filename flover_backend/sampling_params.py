"""Per-request generation settings, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flover_backend.errors import InvalidRequestError
from flover_backend.structured_output import GuidedDecoding, guided_decoding

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # longer ones would hold back that much streamed text, waiting to rule them out
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs and OpenAI's top_logprobs
MAX_REPETITION_PENALTY = 2.0  # vLLM's bound
# Below this, temperature scaling could overflow float32 (logits / 1e-38 is inf) long before it could change
# which token wins, so such requests take the most likely token, exactly as temperature 0 does.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0, or anything below MIN_SAMPLING_TEMPERATURE (1e-5), means greedy: the most likely token.
    top_k keeps the k most likely tokens (0 keeps all), then top_p keeps the fewest most likely of those whose
    probability reaches top_p (1 keeps all); tokens tied with the last one kept by either stay too. A seed
    makes the tokens depend on the seed and the logits alone, never on what else shares the batch.

    Penalties change the logits a row draws from (greedy rows too): repetition_penalty divides the positive
    logits of the tokens seen in the prompt or the output and multiplies the negative ones (HF / vLLM);
    frequency_penalty subtracts per time a token was generated, presence_penalty once if it was (OpenAI).
    min_tokens masks eos and the stop token ids, and keeps stop strings from ending the request, until that
    many tokens were generated. logprobs asks for the chosen token's logprob and its `logprobs` most likely
    alternatives, from the model's raw distribution (before penalties and temperature, as vLLM's default).

    guided_json (a JSON schema, or its text), guided_regex or guided_choice (a list of strings), vLLM's names,
    constrain the output to compact JSON valid under the schema, a match of the regex, or one of the choices;
    the request ends with finish_reason stop when that grammar is complete (see flover_backend.grammar).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0  # 1 disables it
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the N most likely ones'
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        _check(_is_int(self.max_tokens), "max_tokens", f"must be an integer, got {self.max_tokens!r}")
        _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(_is_number(self.temperature) and 0.0 <= self.temperature <= 100.0,
               "temperature", f"must be in [0, 100], got {self.temperature!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
               "seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        _check(isinstance(self.stop, list) and len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"must be a list of at most {MAX_STOP_STRINGS} strings")
        _check(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
               f"must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters")
        _check(isinstance(self.stop_token_ids, list) and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
               "stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must be non-negative integers")
        self._stop_token_set = frozenset(self.stop_token_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be an integer in [0, max_tokens = {self.max_tokens}], got {self.min_tokens!r}")
        _check(_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
               "repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value!r}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or null, got {self.logprobs!r}")
        self._guided = guided_decoding(self.guided_json, self.guided_regex, self.guided_choice)
        # The grammar decides where a guided output ends: holding its end back would leave it no token to take.
        _check(self._guided is None or self.min_tokens == 0, "min_tokens",
               f"cannot be combined with {self._guided.field if self._guided else ''}: the grammar decides where "
               "the output ends")

    def is_stop_token(self, token_id: int) -> bool:
        """Whether `token_id` is one of the request's stop tokens (a set look-up, however many there are)."""
        return token_id in self._stop_token_set

    @property
    def guided(self) -> GuidedDecoding | None:
        """The grammar the output must follow (guided_json / guided_regex / guided_choice); None if free."""
        return self._guided

    @property
    def greedy(self) -> bool:
        """Whether the request takes the most likely token every step."""
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty changes the logits this request draws from."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a JSON-like dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequestError("sampling_parameters", f"unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidRequestError("sampling_parameters", str(exc)) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(field_name, message)
