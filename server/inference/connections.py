"""HTTP connection limits the service needs from its server, before a request reaches it:
request headers of at most :data:`MAX_HEADER_BYTES` (431 above) that arrive within
:data:`HEADER_SECONDS` (the connection is closed otherwise).

uvicorn's default HTTP implementation (httptools, when installed) ignores
``h11_max_incomplete_event_size``: headers of any size were buffered (4 connections x 64
MiB of unfinished headers grew the process by 256 MiB). So the service runs on h11, whose
parser refuses an incomplete event above the limit, through :class:`BoundedH11Protocol`,
which answers that refusal with 431 (uvicorn answers every h11 error with 400) and closes
a connection whose request headers do not complete in time (uvicorn has no such timer: a
client trickling a header line every few seconds kept its connection, and its buffer,
for ever). :func:`server_config` is the one place the app is configured for uvicorn:
``poi serve``, the tests and the benchmarks use it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 32 * 1024  # the request line and all headers together
HEADER_SECONDS = 10.0  # from a connection's (or a keep-alive request's) first byte
KEEP_ALIVE_SECONDS = 5


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a 431 for oversized headers and a header timer."""

    header_seconds = HEADER_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._oversized = False
        next_event = self.conn.next_event

        def checked_next_event() -> Any:
            try:
                event = next_event()
            except h11.RemoteProtocolError as exc:
                self._oversized = exc.error_status_hint == 431
                raise
            # h11 bounds only an INCOMPLETE event: headers that arrive in one read are
            # parsed whatever their size, so the complete ones are measured too.
            if isinstance(event, h11.Request) and header_bytes(event) > MAX_HEADER_BYTES:
                self._oversized = True
                raise h11.RemoteProtocolError("request headers too large",
                                              error_status_hint=431)
            return event

        self.conn.next_event = checked_next_event  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are complete
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_seconds, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:
                self._send_plain(408, f"request headers not received within "
                                      f"{self.header_seconds:g} s")
            else:
                self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self._oversized:
            self._send_plain(431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
        else:
            super().send_400_response(msg)

    def _send_plain(self, status: int, message: str) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        self.transport.write(b"".join([
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode("ascii"),
            *(name + b": " + value + b"\r\n" for name, value in headers),
            f"content-length: {len(message)}\r\n\r\n{message}".encode("ascii")]))
        self.transport.close()


def header_bytes(request: h11.Request) -> int:
    """The size of a request's head as sent, up to whitespace: request line, and each
    header as ``name: value`` with its CRLF."""
    line = len(request.method) + len(request.target) + len(b" HTTP/1.1\r\n") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers.raw_items())


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


def server_config(app: Any, *, host: str, port: int, header_seconds: float = HEADER_SECONDS,
                  **options: Any) -> uvicorn.Config:
    """The uvicorn configuration every server of the app uses: h11 with the header limits
    above, keep-alive connections closed after :data:`KEEP_ALIVE_SECONDS` idle."""
    protocol = type("BoundedH11", (BoundedH11Protocol,), {"header_seconds": header_seconds})
    options.setdefault("log_level", "warning")
    return uvicorn.Config(app, host=host, port=port, http=protocol,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_keep_alive=KEEP_ALIVE_SECONDS, **options)
