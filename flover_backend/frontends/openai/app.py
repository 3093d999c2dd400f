"""The OpenAI-compatible HTTP routes (Starlette): a thin front that turns each request into one Triton stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tokenizers import Tokenizer

from flover_backend.admission import check_admission
from flover_backend.errors import InvalidRequestError
from flover_backend.frontends.openai import generation
from flover_backend.frontends.openai.chat import ChatTemplate, ChatTemplateError, NoChatTemplateError
from flover_backend.frontends.openai.errors import APIError, bad_request, model_not_found
from flover_backend.frontends.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    Limits,
    parse,
)
from flover_backend.frontends.openai.triton_backend import ModelInfo, TritonBackend
from flover_backend.paths import checkpoint_dir

logger = logging.getLogger(__name__)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_DRAIN_BYTES = 16 << 20  # an oversized body is read (and dropped) this far, so the client sees its 413


@dataclass(frozen=True)
class FrontSettings:
    """Where Triton is, where chat templates come from, and the bounds on requests."""

    triton_grpc_url: str = "127.0.0.1:8001"
    model_path: str | None = None  # checkpoint for every model's chat template; default: each model's `model`
    admin_key: str | None = None  # tritonserver's admin key, to list the served models
    limits: Limits = field(default_factory=Limits)
    # vLLM's behaviour: special-token text in chat messages becomes special ids (a user can forge turns).
    special_tokens_in_messages: bool = False
    body_timeout_s: float = 60.0  # a request body must arrive within this (a trickled one gets 408)

    def __post_init__(self) -> None:
        if not self.body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be positive, got {self.body_timeout_s!r}")


class ChatTemplates:
    """Chat templates by checkpoint, read once (off the event loop) when a model first gets a chat request."""

    def __init__(self, model_path: str | None):
        self.model_path = model_path
        self._templates: dict[str, ChatTemplate] = {}
        self._lock = asyncio.Lock()

    async def get(self, info: ModelInfo) -> ChatTemplate:
        """The chat template of the model's checkpoint, read once."""
        spec = self.model_path or info.checkpoint
        async with self._lock:
            if spec not in self._templates:
                self._templates[spec] = await asyncio.to_thread(_load_template, info.name, spec)
        return self._templates[spec]

    async def tokenizer(self, info: ModelInfo) -> Tokenizer:
        """The tokenizer of the model's checkpoint (`tokenizer.json`), read once; to echo a prompt's tokens."""
        tokenizer = (await self.get(info)).tokenizer
        if tokenizer is None:
            raise bad_request("echo", f"model {info.name!r}: its checkpoint has no tokenizer.json to echo "
                                      f"the prompt's tokens with")
        return tokenizer


@dataclass(frozen=True)
class Echo:
    """A completion prompt as sent to the engine, with its echoed text and, with prompt logprobs, its first
    token's text (which has no logprob)."""

    text: str
    prompt: str | list[int]
    first_token: str = ""

    @classmethod
    def of(cls, tokenizer: Tokenizer, prompt: str | list[int], with_logprobs: bool) -> Echo:
        """The prompt as token ids if its logprobs are shown (the front then knows its first token), else as given.
        Ids are tokenized as the engine tokenizes text (special tokens added)."""
        ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) and with_logprobs else prompt
        text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)
        first = tokenizer.decode(ids[:1], skip_special_tokens=False) if with_logprobs else ""
        return cls(text, ids, first)


def _load_template(model: str, spec: str) -> ChatTemplate:
    # The model server has written a built-in checkpoint by the time it serves; the front only reads it.
    try:
        return ChatTemplate.from_checkpoint(checkpoint_dir(spec))
    except (OSError, ValueError) as exc:
        raise APIError(500, f"cannot read the chat template of model {model!r} from {spec!r}: {exc}; "
                            f"start the front with --model-path pointing at its checkpoint") from None


class Front:
    """The route handlers, around one Triton backend."""

    def __init__(self, settings: FrontSettings):
        self.settings, self.limits = settings, settings.limits
        self.backend = TritonBackend(settings.triton_grpc_url, settings.admin_key)
        self.templates = ChatTemplates(settings.model_path)
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        """200 while tritonserver is ready, 503 otherwise."""
        ready = await self.backend.is_ready()
        return JSONResponse({"status": "ok" if ready else "triton not ready"}, status_code=200 if ready else 503)

    async def list_models(self, request: Request) -> Response:
        """`/v1/models`: the models Triton serves."""
        names = await self.backend.model_names()
        return JSONResponse({"object": "list", "data": [self._model_card(name) for name in names]})

    async def get_model(self, request: Request) -> Response:
        """`/v1/models/{model}`: one served model, or a 404."""
        name = request.path_params["model"]
        if await self.backend.model_info(name) is None:
            raise model_not_found(name)
        return JSONResponse(self._model_card(name))

    async def completions(self, request: Request) -> Response:
        """`/v1/completions`, streamed or not: each prompt is a request of the engine's and a choice of the answer."""
        body = parse(CompletionRequest, await self._body(request))
        prompts = body.check(self.limits)
        info = await self._model(body.model)
        # max_tokens 0 (echo only): the engine makes one token, which nobody sees.
        max_tokens = 1 if body.max_tokens == 0 else body.max_tokens or DEFAULT_COMPLETION_TOKENS
        for prompt in prompts:  # a text prompt's tokens are counted where it is tokenized, by the engine
            if isinstance(prompt, str):
                admit(info, "prompt", num_prompt_bytes=len(prompt.encode("utf-8", "replace")))
            else:
                admit(info, "prompt", num_prompt_tokens=len(prompt), max_tokens=max_tokens)
        fields = body.triton_fields(max_tokens)
        echoes = [Echo(prompt if isinstance(prompt, str) else "", prompt) for prompt in prompts]
        if body.echo and (body.prompt_logprobs or any(not isinstance(prompt, str) for prompt in prompts)):
            tokenizer = await self.templates.tokenizer(info)
            echoes = await asyncio.to_thread(lambda: [Echo.of(tokenizer, prompt, body.prompt_logprobs)
                                                      for prompt in prompts])
        envelope = Envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", info.name)
        answers = [generation.Answer(envelope, chat=False, include_usage=body.include_usage,
                                     return_token_ids=bool(body.return_token_ids), echo=echo.text if body.echo else "",
                                     num_logprobs=body.num_logprobs, continuous_usage=body.continuous_usage,
                                     index=index, first_token=echo.first_token)
                   for index, echo in enumerate(echoes)]
        inputs = [fields | {"text_input" if isinstance(echo.prompt, str) else "input_ids": echo.prompt}
                  for echo in echoes]
        return await self._answer(request, info, answers, inputs, stream=bool(body.stream), prompt_param="prompt",
                                  generated=body.max_tokens != 0)

    async def chat_completions(self, request: Request) -> Response:
        """`/v1/chat/completions`, streamed or not."""
        body = parse(ChatCompletionRequest, await self._body(request))
        messages = body.check(self.limits)
        info = await self._model(body.model)
        template = await self.templates.get(info)
        try:
            prompt_ids = await asyncio.to_thread(template.encode, messages, self.settings.special_tokens_in_messages)
        except NoChatTemplateError as exc:
            raise bad_request("model", f"model {info.name!r}: {exc}", code="no_chat_template") from None
        except ChatTemplateError as exc:
            raise bad_request("messages", str(exc)) from None
        admit(info, "messages", num_prompt_tokens=len(prompt_ids), max_tokens=body.max_tokens)
        # Chat's default max_tokens (OpenAI's too): the room the prompt leaves.
        fields = body.triton_fields(body.max_tokens or info.max_model_len - len(prompt_ids)) | {"input_ids": prompt_ids}
        answer = generation.Answer(Envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", info.name),
                                   chat=True, include_usage=body.include_usage,
                                   return_token_ids=bool(body.return_token_ids), num_logprobs=body.num_logprobs,
                                   continuous_usage=body.continuous_usage)
        if body.stream:
            answer.envelope.object = "chat.completion.chunk"
        return await self._answer(request, info, [answer], [fields], stream=bool(body.stream), prompt_param="messages")

    async def _answer(self, request: Request, info: ModelInfo, answers: list[generation.Answer], inputs: list[dict],
                      *, stream: bool, prompt_param: str, generated: bool = True) -> Response:
        """One Triton stream per prompt (`inputs[i]` answered by `answers[i]`); without `generated`, only the
        echoed prompts are shown."""
        envelope = answers[0].envelope
        streams = [self.backend.generate(info, fields, prompt_param=prompt_param,
                                         request_id=envelope.id if len(inputs) == 1 else f"{envelope.id}-{index}")
                   for index, fields in enumerate(inputs)]
        if not generated:
            streams = [generation.prompt_only(deltas) for deltas in streams]
        if stream:
            return await generation.streamed(request, answers, streams)
        return await generation.whole(request, answers, streams)

    async def _model(self, name: str) -> ModelInfo:
        info = await self.backend.model_info(name)
        if info is None:
            raise model_not_found(name)
        return info

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 past `max_body_bytes` (before it is parsed or kept), and with
        408 (the connection then closed) unless it has all arrived within `body_timeout_s`."""
        timeout = self.settings.body_timeout_s
        try:
            return await asyncio.wait_for(self._read_body(request), timeout)
        except asyncio.TimeoutError:  # the access log's line says it: no line of ours
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                           headers={"Connection": "close"}) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _drain(request)
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                await _drain(request)
                raise too_large
        return bytes(body)

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "flover"}


def admit(info: ModelInfo, prompt_param: str, **counts) -> None:
    """The engine's admission (admission.check_admission) decided here, before the request is sent: a 400 naming
    the request's parameter (`prompt_param` for the prompt)."""
    try:
        check_admission(info.admission, **counts)
    except InvalidRequestError as exc:
        raise bad_request(prompt_param if exc.field == "prompt" else exc.field, exc.message) from None


async def _drain(request: Request) -> None:
    """Read and drop the rest of a refused body, so the client gets the answer instead of a reset."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > MAX_DRAIN_BYTES:
                return


def create_app(settings: FrontSettings) -> Starlette:
    """The ASGI app; its lifespan opens (and closes) the gRPC channel to Triton."""
    front = Front(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        """Open the gRPC channel to Triton for the app's life."""
        await front.backend.start()
        try:
            yield
        finally:
            await front.backend.close()

    routes = [
        Route("/health", front.health, methods=["GET"]),
        Route("/v1/models", front.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", front.get_model, methods=["GET"]),
        Route("/v1/completions", front.completions, methods=["POST"]),
        Route("/v1/chat/completions", front.chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, ClientDisconnect: _client_gone,
                Exception: _internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.front = front
    return app


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """A client that hung up mid-body is an event, not a fault: one line, and nobody to answer."""
    logger.info("%s %s from %s: the client disconnected before sending the whole body", request.method,
                request.url.path, _peer(request))
    return Response(status_code=499)


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
