"""OpenAI request bodies (pydantic, strict, unknown fields refused), their limits, and the response bodies."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flover_backend.openai_front.errors import bad_request
from flover_backend.openai_front.response_format import ResponseFormat

MAX_STOP_STRINGS = 16  # the engine's own bound (sampling_params.MAX_STOP_STRINGS)
MAX_LOGPROBS = 20  # the engine's own bound (sampling_params.MAX_LOGPROBS)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
StopString = Annotated[str, Field(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


@dataclass(frozen=True)
class Limits:
    """Bounds on every request, checked before any work is done on it."""

    max_body_bytes: int = 1 << 20  # the whole JSON body
    max_messages: int = 256  # chat messages per request
    max_prompt_chars: int = 1 << 19  # a text prompt, or all message contents together
    max_prompt_tokens: int = 1 << 16  # a prompt given as token ids

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a boolean; forbid: a field we don't know is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """OpenAI's `stream_options`: whether the last chunk carries the usage."""
    include_usage: bool = False


class _Sampling(_Strict):
    """What completions and chat completions share. null means the default, as in OpenAI's API."""

    model: Name
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's default: 1
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    user: str | None = Field(None, max_length=256)
    # Extensions that vLLM's server has too (clients.loadgen sends some): top-k, run to max_tokens, ids back,
    # at least min_tokens, repetition penalty.
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0, le=1 << 20)  # the engine checks it against max_tokens
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    return_token_ids: bool | None = None
    response_format: ResponseFormat | None = None  # structured output: see response_format.py

    def check_supported(self) -> None:
        """Refuse, naming the parameter, what the engine cannot do rather than silently ignoring it."""
        if self.n not in (None, 1):
            raise bad_request("n", f"only n=1 is supported, got {self.n}")
        if self.logit_bias:
            raise bad_request("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "is only allowed with stream: true")

    @property
    def stop_list(self) -> list[str]:
        """The stop strings as a list, whatever form the request gave them in."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token that the answer shows; None: no logprobs."""
        raise NotImplementedError

    def triton_fields(self, max_tokens: int) -> dict:
        """The flover model's sampling inputs (the prompt is added by the caller)."""
        fields = {"max_tokens": max_tokens, "temperature": 1.0 if self.temperature is None else self.temperature,
                  "top_p": self.top_p or 1.0, "top_k": self.top_k or 0, "ignore_eos": bool(self.ignore_eos),
                  "stream": True}
        optional = {"seed": self.seed, "stop": self.stop_list or None, "min_tokens": self.min_tokens,
                    "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                    "frequency_penalty": self.frequency_penalty}
        fields |= {name: value for name, value in optional.items() if value is not None}
        sampling = self.response_format.sampling_parameters() if self.response_format else {}
        if self.num_logprobs is not None:  # the number only goes in sampling_parameters, as vLLM's backend takes it
            fields["return_logprobs"] = True
            sampling["logprobs"] = self.num_logprobs
        if sampling:
            fields["sampling_parameters"] = json.dumps(sampling)
        return fields


class CompletionRequest(_Sampling):
    """A `/v1/completions` request: one prompt, as text or token ids."""
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives per token the answer carries logprobs for; None: no logprobs."""
        return self.logprobs

    def check(self, limits: Limits) -> str | list[int]:
        """Check the request; return its one prompt, text or token ids."""
        self.check_supported()
        if self.echo and self.logprobs is not None:
            raise bad_request("echo", "with logprobs is not supported: the engine gives no prompt logprobs")
        if self.best_of not in (None, 1):
            raise bad_request("best_of", "only best_of=1 is supported")
        if self.suffix is not None:
            raise bad_request("suffix", "is not supported")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request("prompt", f"one prompt per request is supported, got {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise bad_request("prompt", "must not be empty")
        if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
            raise bad_request("prompt", f"is {len(prompt)} characters; at most {limits.max_prompt_chars}")
        if isinstance(prompt, list) and len(prompt) > limits.max_prompt_tokens:
            raise bad_request("prompt", f"is {len(prompt)} token ids; at most {limits.max_prompt_tokens}")
        if self.echo and not isinstance(prompt, str):
            raise bad_request("echo", "needs a text prompt")
        return prompt


class TextPart(_Strict):
    """One text part of a message's content list."""
    type: Literal["text"]
    text: str


class Message(_Strict):
    """One chat message: a role and its content."""
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Name | None = None

    @property
    def text(self) -> str:
        """The message's text, its parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """A `/v1/chat/completions` request: the messages the chat template renders."""
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives per token the answer carries logprobs for; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self, limits: Limits) -> list[dict]:
        """Check the request; return the messages as the chat template takes them."""
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise bad_request("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
            self.max_tokens = self.max_completion_tokens
        self.check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "needs logprobs: true")
        if len(self.messages) > limits.max_messages:
            raise bad_request("messages", f"{len(self.messages)} messages; at most {limits.max_messages}")
        messages = [{"role": m.role, "content": m.text} | ({"name": m.name} if m.name else {})
                    for m in self.messages]
        total = sum(len(m["content"]) for m in messages)
        if total > limits.max_prompt_chars:
            raise bad_request("messages", f"{total} characters of content; at most {limits.max_prompt_chars}")
        return messages


def parse(model: type[_Sampling], body: bytes) -> _Sampling:
    """Validate a JSON body into `model`, or raise a 400 naming the first parameter at fault."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise bad_request(None, f"the body is not valid JSON: {errors[0]['msg']}") from None
        # A value that fits no member of a union fails once per member; the deepest failure says most
        # ("messages.0.content.0.type: Input should be 'text'", not "... should be a valid string").
        located = [(_param(error), error) for error in errors]
        param, error = max(located, key=lambda item: item[0].count(".") + bool(item[0]))
        if error["type"] == "extra_forbidden":
            raise bad_request(param, "unrecognized request argument") from None
        raise bad_request(param or None, error["msg"]) from None


def _param(error: dict) -> str:
    """The parameter an error is about, e.g. "messages.0.content": fields and indexes, not union members."""
    loc, unknown = error["loc"], error["type"] == "extra_forbidden"  # then the last part is the unknown name
    return ".".join(str(part) for at, part in enumerate(loc)
                    if isinstance(part, int) or part in _FIELD_NAMES or (unknown and at == len(loc) - 1))


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    """OpenAI's `usage` object from the engine's token counts."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


@dataclass
class Envelope:
    """The fields every response (and every streamed chunk) of one request repeats."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list[dict], **extra) -> dict:
        """The response object around `choices`."""
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


_FIELD_NAMES = {name for model in (CompletionRequest, ChatCompletionRequest, Message, TextPart, StreamOptions,
                                    ResponseFormat) for name in model.model_fields}
