"""Per-request generation settings: a dataclass whose fields and checks come from the parameter table."""

from __future__ import annotations

import dataclasses
from typing import Any

from flover_backend.errors import InvalidRequestError
from flover_backend.param_table import PARAMS, Param
from flover_backend.sampling.structured_output import GuidedDecoding, guided_decoding

# Below this, temperature scaling could overflow float32 (logits / 1e-38 is inf) long before it could change
# which token wins, so such requests take the most likely token, exactly as temperature 0 does.
MIN_SAMPLING_TEMPERATURE = 1e-5


class _SamplingParamsBase:
    """How one request picks its tokens and when it stops (fields: `param_table.PARAMS`).

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
    """

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        for param in PARAMS:
            param.check(getattr(self, param.name))
        # What one parameter's bounds cannot say alone.
        _check(self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens = {self.max_tokens}, got {self.min_tokens!r}")
        _check(self.detokenize or not self.stop, "detokenize", "false leaves no text to find stop strings in")
        self._stop_token_set = frozenset(self.stop_token_ids)
        self._guided = guided_decoding(self.guided_json, self.guided_regex, self.guided_choice)
        # The grammar decides where a guided output ends: holding its end back would leave it no token to take.
        _check(self._guided is None or self.min_tokens == 0, "min_tokens",
               f"cannot be combined with {self._guided.field if self._guided else ''}: the grammar decides where "
               "the output ends")

    @property
    def guided(self) -> GuidedDecoding | None:
        """The grammar the output must follow (guided_json / guided_regex / guided_choice); None if free."""
        return self._guided

    def ending_token_ids(self, eos_token_ids: frozenset[int]) -> frozenset[int]:
        """Every token that ends this request once past min_tokens: its stop tokens, and eos unless ignored."""
        return self._stop_token_set if self.ignore_eos else self._stop_token_set | eos_token_ids

    def ends_on(self, token_id: int, eos_token_ids: frozenset[int]) -> bool:
        """Whether `token_id` ends this request (once past min_tokens); as `ending_token_ids`, without a set."""
        return token_id in self._stop_token_set or (not self.ignore_eos and token_id in eos_token_ids)

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
        return cls(**values)


def dataclass_of(params: tuple[Param, ...]) -> type:
    """A SamplingParams class with one field per table row (tests derive one from a longer table)."""
    fields = [(p.name, f"{p.kind.__name__}{' | None' if p.nullable else ''}",
               dataclasses.field(default_factory=list) if p.is_list else dataclasses.field(default=p.default))
              for p in params]
    cls = dataclasses.make_dataclass("SamplingParams", fields, bases=(_SamplingParamsBase,))
    cls.__module__ = __name__  # so pickle (tensor-parallel workers) finds it here
    return cls


SamplingParams = dataclass_of(PARAMS)


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(field_name, message)
