"""uvicorn's HTTP/1.1 protocol (h11) with the deadlines it lacks: for a request's head, and for a body left unread.

uvicorn times out only idle kept-alive connections. A connection that never finishes its request head, or that
keeps trickling a body the app has already answered, is held for ever, and `limit_concurrency` such
connections make every other client's request a 503. The app bounds the body it reads (`body_timeout_s`);
this bounds the rest.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"connection: close\r\ncontent-length: 16\r\n\r\nRequest Timeout\n")


class BoundedH11Protocol(H11Protocol):
    """A request's head must arrive within `header_timeout_s` of the connection or of its first byte; a body
    still arriving after its answer was sent is cut off `body_timeout_s` later. Each cut is one log line."""

    header_timeout_s = 10.0
    body_timeout_s = 60.0
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept the connection; its first request's head is due within `header_timeout_s`."""
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def data_received(self, data: bytes) -> None:
        """Feed h11; then a started head is timed, and a finished head or body is no longer."""
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE and self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)
        elif state is not h11.IDLE:
            self._head_timer = _cancel(self._head_timer)
        if state is not h11.SEND_BODY:
            self._body_timer = _cancel(self._body_timer)

    def on_response_complete(self) -> None:
        """The answer is out; if the client is still sending a body nobody reads, it has `body_timeout_s`."""
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_late)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the deadlines of a closed connection."""
        self._head_timer = _cancel(self._head_timer)
        self._body_timer = _cancel(self._body_timer)
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        started = bool(self.conn.trailing_data[0])  # bytes of an unfinished head, held by h11
        if started:  # nothing is owed to a connection that sent nothing
            self.transport.write(TIMEOUT_RESPONSE)
        logger.info("%s: %s within %g s: closed", self._peer(), "no complete request head" if started
                    else "no request", self.header_timeout_s)
        self.transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            logger.info("%s: a request body still arriving %g s after its answer: closed", self._peer(),
                        self.body_timeout_s)
            self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def bounded_h11(header_timeout_s: float, body_timeout_s: float) -> type[BoundedH11Protocol]:
    """The protocol class to give uvicorn (`http=`), with these deadlines."""
    for name, value in (("header_timeout_s", header_timeout_s), ("body_timeout_s", body_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"header_timeout_s": header_timeout_s,
                                                              "body_timeout_s": body_timeout_s})


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()
