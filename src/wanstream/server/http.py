"""The HTTP server around the app: uvicorn with limits on connections that never finish a request.

uvicorn arms its keep-alive timer only after a response, and cancels it as soon as any byte arrives, so a
client that opens a connection and sends its headers slowly, or never finishes them, would hold the
connection (and its buffers) open forever. `HeaderDeadlineProtocol` gives every request
`HEADER_TIMEOUT_S` from its first byte (or from the connection, for the first request) to finish its
headers; after that the connection is closed. Header size is bounded by h11 (`MAX_HEADER_BYTES`), idle
keep-alive connections are closed after `KEEP_ALIVE_S`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
# Longer than clients keep idle connections pooled (httpx: 5 s): a server that closes an idle connection at
# the moment a client reuses it makes that request fail (seen in the soak with uvicorn's own 5 s).
KEEP_ALIVE_S = 20.0
MAX_HEADER_BYTES = 16 * 1024
GRACEFUL_SHUTDOWN_S = 10.0  # SIGTERM: requests still open after this are cancelled, then sessions close
MAX_CONNECTIONS = 512  # beyond this uvicorn answers 503 at once instead of queueing work


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()  # a request has begun (or is awaited): its headers must finish
        else:
            self._cancel_header_deadline()  # the headers are in: the app decides from here

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None and not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # the keep-alive timer covers the idle time between requests
        self._cancel_header_deadline()


def uvicorn_options(header_timeout_s: float = HEADER_TIMEOUT_S) -> dict[str, Any]:
    protocol = type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout_s})
    return {
        "http": protocol,
        "ws": "auto",
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "limit_concurrency": MAX_CONNECTIONS,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }


def serve(
    app: Any, *, host: str, port: int, log_level: str, header_timeout_s: float = HEADER_TIMEOUT_S
) -> None:
    """Run `app` until SIGINT / SIGTERM (blocking)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(header_timeout_s))
