"""OpenAI request bodies (pydantic, strict, unknown fields refused), their limits, and the response bodies."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flover_backend.frontends.openai.errors import bad_request
from flover_backend.frontends.openai.response_format import ResponseFormat
from flover_backend.frontends.openai.table_fields import TableFields
from flover_backend.param_table import MAX_LOGPROBS, MAX_TOKEN_ID

Name = Annotated[str, Field(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
MetadataKey = Annotated[str, Field(max_length=64)]  # OpenAI's bounds on `metadata`
MetadataValue = Annotated[str, Field(max_length=512)]


@dataclass(frozen=True)
class Limits:
    """Bounds on every request, checked before any work is done on it."""

    max_body_bytes: int = 1 << 20  # the whole JSON body
    max_messages: int = 256  # chat messages per request
    max_prompt_chars: int = 1 << 19  # a text prompt, or all message contents together
    max_prompt_tokens: int = 1 << 16  # a prompt given as token ids
    max_prompts: int = 64  # prompts in one completions request: each is a request of the engine's

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a boolean; forbid: a field we don't know is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """OpenAI's `stream_options`: the usage on a last chunk, and (vLLM's) on every chunk as it grows."""
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(TableFields, _Strict):
    """What completions and chat completions share. null means the default, as in OpenAI's API.

    The sampling fields (temperature, top_p, stop, seed, penalties, and vLLM's extensions top_k, min_tokens,
    ignore_eos, skip_special_tokens, ...) come from the parameter table (`TableFields`), bounds included.
    """

    model: Name
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    return_token_ids: bool | None = None  # vLLM's: each choice carries its token ids
    # Fields clients send by default that change nothing here: accepted, bounded, and not acted on (one tier,
    # nothing is stored, the end user's id only matters to OpenAI's abuse monitoring).
    user: str | None = Field(None, max_length=256)
    store: bool | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        """Refuse, naming the parameter, what the engine cannot do rather than silently ignoring it."""
        if self.logit_bias:
            raise bad_request("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "is only allowed with stream: true")

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every streamed chunk carries the usage so far (vLLM's `continuous_usage_stats`)."""
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token that the answer shows; None: no logprobs."""
        raise NotImplementedError

    def triton_fields(self, max_tokens: int) -> dict:
        """The flover model's inputs but the prompt: every sampling setting in one `sampling_parameters` JSON
        (as vllm_backend takes them), streamed, with the outputs the answer needs."""
        values = self.engine_values() | {"max_tokens": max_tokens}
        if self.response_format:  # structured output: a guided_* key (response_format.py)
            values |= self.response_format.sampling_parameters()
        fields = {"stream": True}
        if self.num_logprobs is not None:
            values["logprobs"] = self.num_logprobs
            fields["return_logprobs"] = True
        if self.continuous_usage:  # the prompt's token count on every response, for the usage on every chunk
            fields["return_num_input_tokens"] = True
        return fields | {"sampling_parameters": json.dumps(values)}


class CompletionRequest(_Sampling):
    """A `/v1/completions` request: one prompt or several, each as text or token ids."""
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    # 0 only with echo: the prompt (and with logprobs, its logprobs) back, nothing generated, as vLLM allows.
    max_tokens: int | None = Field(None, ge=0, le=1 << 20)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, max_length=256)  # text after the completion (insertion): only ""

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives per token the answer carries logprobs for; None: no logprobs."""
        return self.logprobs

    @property
    def prompt_logprobs(self) -> bool:
        """Whether the answer carries the prompt's logprobs: `echo` with `logprobs`, as OpenAI's legacy API."""
        return bool(self.echo) and self.logprobs is not None

    def check(self, limits: Limits) -> list[str | list[int]]:
        """Check the request; return its prompts (at most `limits.max_prompts`), each text or token ids."""
        self.check_supported()
        if self.suffix:
            raise bad_request("suffix", "is not supported (no insertion); only an empty suffix is accepted")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens", "0 is only allowed with echo: true")
        prompts = self.prompt
        if not (isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list))):
            prompts = [prompts]
        if len(prompts) > limits.max_prompts:
            raise bad_request("prompt", f"{len(prompts)} prompts; at most {limits.max_prompts} per request")
        for prompt in prompts:
            if not prompt:
                raise bad_request("prompt", "must not be empty")
            if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
                raise bad_request("prompt", f"is {len(prompt)} characters; at most {limits.max_prompt_chars}")
            if isinstance(prompt, list) and len(prompt) > limits.max_prompt_tokens:
                raise bad_request("prompt", f"is {len(prompt)} token ids; at most {limits.max_prompt_tokens}")
        return prompts

    def triton_fields(self, max_tokens: int) -> dict:
        """The flover model's sampling inputs, with `prompt_logprobs` in sampling_parameters if echo asks."""
        fields = super().triton_fields(max_tokens)
        if self.prompt_logprobs:
            extra = json.loads(fields["sampling_parameters"])
            fields["sampling_parameters"] = json.dumps(extra | {"prompt_logprobs": self.logprobs})
        return fields


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


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> dict:
    """OpenAI's `usage` object from the engine's token counts (cached: prompt tokens reused, not computed)."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


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
