"""One generation answered in OpenAI's shapes: whole (a JSON body) or streamed (server-sent events)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from flover_backend.frontends.openai.errors import APIError
from flover_backend.frontends.openai.logprobs import (
    chat_logprobs,
    completion_logprobs,
    prompt_completion_logprobs,
)
from flover_backend.frontends.openai.protocol import Envelope, usage
from flover_backend.frontends.openai.triton_backend import Delta

DONE = b"data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


@dataclass
class Answer:
    """What to send back for one prompt of a request: its kind, and the options that shape its choice."""

    envelope: Envelope
    chat: bool
    include_usage: bool = False
    return_token_ids: bool = False
    echo: str = ""  # a completion's prompt, sent before its text (`echo`)
    num_logprobs: int | None = None  # alternatives per token in `logprobs`; None: no logprobs
    continuous_usage: bool = False  # every streamed chunk carries the usage so far (stream_options)
    text_offset: int = 0  # a completion's: where the next token's text starts in the choice's text
    index: int = 0  # the choice's: which prompt of the request it answers
    first_token: str = ""  # an echoed prompt's first token's text, when the prompt's logprobs are shown

    def choice(self, text: str, token_ids: list[int], finish_reason: str | None, *, stream: bool,
               first: bool = False, logprobs: list[dict] | None = None,
               prompt_logprobs: list[dict] | None = None) -> dict:
        """One choice of a response or of a streamed chunk."""
        if not self.chat:
            body = {"text": text}
        elif not stream:
            body = {"message": {"role": "assistant", "content": text}}
        else:  # the first delta names the role; the last may carry no text, only the finish reason
            delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
            body = {"delta": delta}
        choice = {"index": self.index, **body, "logprobs": self._logprobs(logprobs or [], prompt_logprobs),
                  "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def _logprobs(self, steps: list[dict], prompt_steps: list[dict] | None = None) -> dict | None:
        """These tokens' logprobs in the endpoint's shape, if the request asked for them; an echoed prompt's first."""
        if self.num_logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(steps, self.num_logprobs)
        prompt = None
        if prompt_steps is not None:
            prompt, self.text_offset = prompt_completion_logprobs(self.first_token, prompt_steps, self.text_offset)
        shaped, self.text_offset = completion_logprobs(steps, self.text_offset)
        return shaped if prompt is None else {key: prompt[key] + shaped[key] for key in shaped}


def check_finish(delta: Delta) -> None:
    """An answer the server cut short (it stopped the model, not us) is an error, not a short answer."""
    if delta.finish_reason == "abort":
        raise APIError(503, "the inference server aborted the request (it is stopping)", code="aborted")


async def prompt_only(deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """The deltas with what was generated taken out (`max_tokens: 0`: the engine makes one token, nobody sees it)."""
    try:
        async for delta in deltas:
            yield dataclasses.replace(delta, text="", token_ids=[], num_output_tokens=0,
                                      logprobs=None if delta.logprobs is None else [])
    finally:
        await deltas.aclose()


async def gather_all(awaitables) -> list:
    """Await them all at once; if one fails (or this is cancelled), cancel the rest, so their streams close."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def summed_usage(lasts: list[Delta]) -> dict:
    """`usage` over every prompt of a request, as OpenAI sums it."""
    return usage(sum(d.num_input_tokens for d in lasts), sum(d.num_output_tokens for d in lasts),
                 sum(d.num_cached_tokens for d in lasts))


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


async def whole(request: Request, answers: list[Answer], streams: list[AsyncIterator[Delta]]) -> Response:
    """Collect every prompt's generation (all at once), then answer with one JSON body, a choice per prompt."""
    async def collect(answer: Answer, deltas: AsyncIterator[Delta]) -> tuple[dict, Delta]:
        """One prompt's deltas, gathered into its choice."""
        texts, ids, logprobs, prompt_logprobs, last = [answer.echo], [], [], None, None
        async for delta in deltas:
            texts.append(delta.text)
            ids.extend(delta.token_ids)
            logprobs.extend(delta.logprobs or [])
            prompt_logprobs = delta.prompt_logprobs if delta.prompt_logprobs is not None else prompt_logprobs
            last = delta
        check_finish(last)
        return answer.choice("".join(texts), ids, last.finish_reason, stream=False, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs), last

    try:
        results = await until_disconnect(request, gather_all(collect(*pair) for pair in zip(answers, streams)))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it
    choices = [choice for choice, _ in results]
    return JSONResponse(answers[0].envelope.body(choices, usage=summed_usage([last for _, last in results])))


async def streamed(request: Request, answers: list[Answer], streams: list[AsyncIterator[Delta]]) -> Response:
    """Answer with server-sent events, one per response of the model (of any prompt), then `data: [DONE]`.

    Every prompt's first response is awaited before the status line goes out, so an error the model finds in
    the request (prompt too long, ...) still gets its HTTP status rather than a 200 with an error event.
    """
    try:
        firsts = await until_disconnect(request, gather_all(anext(deltas) for deltas in streams))
    except ClientDisconnected:
        return Response(status_code=499)
    return StreamingResponse(_events(answers, firsts, streams), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(answers: list[Answer], firsts: list[Delta],
                  streams: list[AsyncIterator[Delta]]) -> AsyncIterator[bytes]:
    # Starlette cancels this generator when the client disconnects; closing the streams then cancels the calls.
    extra = {"usage": None} if answers[0].include_usage else {}
    is_first = [True] * len(answers)
    lasts: list[Delta] = []
    waiting: dict[asyncio.Future, int] = {}  # the next delta of each prompt still generating
    ready = list(enumerate(firsts))
    # For continuous usage: each prompt's tokens (every response carries its prompt's count when asked).
    num_prompt_tokens = [first.num_input_tokens for first in firsts]
    num_completion_tokens = [0] * len(answers)
    try:
        while ready:
            for i, delta in ready:
                check_finish(delta)
                answer = answers[i]
                num_completion_tokens[i] += len(delta.token_ids)
                if answer.continuous_usage:
                    extra = {"usage": usage(sum(num_prompt_tokens), sum(num_completion_tokens))}
                text = (answer.echo + delta.text) if is_first[i] else delta.text
                shows_tokens = (answer.return_token_ids or answer.num_logprobs is not None) and delta.token_ids
                if text or delta.finish_reason or is_first[i] or shows_tokens:
                    choice = answer.choice(text, delta.token_ids, delta.finish_reason, stream=True, first=is_first[i],
                                           logprobs=delta.logprobs, prompt_logprobs=delta.prompt_logprobs)
                    yield _event(answer.envelope.body([choice], **extra))
                    is_first[i] = False
                if delta.finish_reason is None:
                    waiting[asyncio.ensure_future(anext(streams[i]))] = i
                else:
                    lasts.append(delta)
            if not waiting:
                break
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            ready = [(waiting.pop(future), future.result()) for future in done]
        if answers[0].include_usage:
            yield _event(answers[0].envelope.body([], usage=summed_usage(lasts)))
    except APIError as error:
        yield _event(error.body())
    finally:
        for future in waiting:
            future.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)  # a stream is closed only once nothing awaits it
        for deltas in streams:
            await deltas.aclose()
    yield DONE


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
