"""One generation answered in OpenAI's shapes: whole (a JSON body) or streamed (server-sent events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from flover_backend.frontends.openai.errors import APIError
from flover_backend.frontends.openai.logprobs import chat_logprobs, completion_logprobs
from flover_backend.frontends.openai.protocol import Envelope, usage
from flover_backend.frontends.openai.triton_backend import Delta

DONE = b"data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


@dataclass
class Answer:
    """What to send back for one request: its kind, and the options that shape each choice."""

    envelope: Envelope
    chat: bool
    include_usage: bool = False
    return_token_ids: bool = False
    echo: str = ""  # a completion's prompt, sent before its text (`echo`)
    num_logprobs: int | None = None  # alternatives per token in `logprobs`; None: no logprobs
    continuous_usage: bool = False  # every streamed chunk carries the usage so far (stream_options)
    text_offset: int = 0  # a completion's: where the next token's text starts in the choice's text

    def choice(self, text: str, token_ids: list[int], finish_reason: str | None, *, stream: bool,
               first: bool = False, logprobs: list[dict] | None = None) -> dict:
        """One choice of a response or of a streamed chunk."""
        if not self.chat:
            body = {"text": text}
        elif not stream:
            body = {"message": {"role": "assistant", "content": text}}
        else:  # the first delta names the role; the last may carry no text, only the finish reason
            delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
            body = {"delta": delta}
        choice = {"index": 0, **body, "logprobs": self._logprobs(logprobs or []), "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def _logprobs(self, steps: list[dict]) -> dict | None:
        """These tokens' logprobs in the endpoint's shape, if the request asked for them."""
        if self.num_logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(steps, self.num_logprobs)
        shaped, self.text_offset = completion_logprobs(steps, self.text_offset)
        return shaped


def check_finish(delta: Delta) -> None:
    """An answer the server cut short (it stopped the model, not us) is an error, not a short answer."""
    if delta.finish_reason == "abort":
        raise APIError(503, "the inference server aborted the request (it is stopping)", code="aborted")


async def until_disconnect(request: Request, awaitable: Awaitable):
    """Await `awaitable`; if the client disconnects first, cancel it and raise ClientDisconnected.

    Cancelling a generation closes its Triton stream, which frees the model's row for others.
    """
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        return work.result()
    raise ClientDisconnected


async def _disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def whole(request: Request, answer: Answer, deltas: AsyncIterator[Delta]) -> Response:
    """Collect the generation, then answer with one JSON body."""
    async def collect() -> tuple[list[str], list[int], list[dict], Delta]:
        """Every delta of a non-streamed generation, gathered."""
        texts, ids, logprobs, last = [answer.echo], [], [], None
        async for delta in deltas:
            texts.append(delta.text)
            ids.extend(delta.token_ids)
            logprobs.extend(delta.logprobs or [])
            last = delta
        return texts, ids, logprobs, last

    try:
        texts, ids, logprobs, last = await until_disconnect(request, collect())
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it
    check_finish(last)
    choice = answer.choice("".join(texts), ids, last.finish_reason, stream=False, logprobs=logprobs)
    return JSONResponse(answer.envelope.body([choice], usage=usage(last.num_input_tokens, last.num_output_tokens,
                                                                               last.num_cached_tokens)))


async def streamed(request: Request, answer: Answer, deltas: AsyncIterator[Delta]) -> Response:
    """Answer with server-sent events, one per response of the model, then `data: [DONE]`.

    The first response is awaited before the status line goes out, so an error the model finds in the
    request (prompt too long, ...) still gets its HTTP status rather than a 200 with an error event.
    """
    try:
        first = await until_disconnect(request, anext(deltas))
    except ClientDisconnected:
        return Response(status_code=499)
    return StreamingResponse(_events(answer, first, deltas), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(answer: Answer, first: Delta, deltas: AsyncIterator[Delta]) -> AsyncIterator[bytes]:
    # Starlette cancels this generator when the client disconnects; closing `deltas` then cancels the call.
    extra = {"usage": None} if answer.include_usage else {}
    delta, is_first = first, True
    num_prompt_tokens, num_completion_tokens = first.num_input_tokens, 0
    try:
        while True:
            check_finish(delta)
            num_completion_tokens += len(delta.token_ids)
            if answer.continuous_usage:
                extra = {"usage": usage(num_prompt_tokens, num_completion_tokens)}
            text = (answer.echo + delta.text) if is_first else delta.text
            shows_tokens = (answer.return_token_ids or answer.num_logprobs is not None) and delta.token_ids
            if text or delta.finish_reason or is_first or shows_tokens:
                choice = answer.choice(text, delta.token_ids, delta.finish_reason, stream=True, first=is_first,
                                       logprobs=delta.logprobs)
                yield _event(answer.envelope.body([choice], **extra))
                is_first = False
            if delta.finish_reason is not None:
                break
            delta = await anext(deltas)
        if answer.include_usage:
            yield _event(answer.envelope.body([], usage=usage(delta.num_input_tokens, delta.num_output_tokens,
                                                                  delta.num_cached_tokens)))
    except APIError as error:
        yield _event(error.body())
    finally:
        await deltas.aclose()
    yield DONE


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
