"""The HTTP server around the app: uvicorn with limits on connections that never finish a request.

uvicorn arms its keep-alive timer only after a response, and cancels it as soon as any byte arrives, so a
client that opens a connection and sends its headers slowly, or never finishes them, would hold the
connection (and its buffers) open forever. `HeaderDeadlineProtocol` gives every request
`HEADER_TIMEOUT_S` from its first byte (or from the connection, for the first request) to finish its
headers; after that the connection is closed. Header size is bounded by h11 (`MAX_HEADER_BYTES`), idle
keep-alive connections are closed after `KEEP_ALIVE_S`.

The listening socket is bound by `listen` before the model loads (`serve` then hands it to uvicorn), so a port
in use or an address this machine does not have is an error at once, not after a minute of loading weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
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
STARTUP_FAILURE = 3  # the exit code uvicorn gives when the app's startup fails


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


class ListenError(OSError):
    """The server cannot listen where it was asked to; the message says what to change."""


_ANY = {socket.AF_INET: "0.0.0.0 for all of them", socket.AF_INET6: ":: for all of them"}


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it, or `ListenError` in words."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = "is in use (another wanstream serve?): stop that server, or pick another --port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = f"is not an address of this machine: give --host one of its addresses, or {_ANY[family]}"
        elif exc.errno == errno.EACCES:
            why = "needs privileges (ports below 1024): pick --port 1024 or above"
        elif isinstance(exc, socket.gaierror):
            why = f"cannot be resolved ({exc.strerror}): give --host an address, e.g. 127.0.0.1"
        else:
            why = f"cannot be listened on ({exc.strerror or exc})"
        raise ListenError(exc.errno, f"{shown} {why}") from exc
    sock.set_inheritable(True)
    return sock


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    sock: socket.socket | None = None,
) -> int:
    """Run `app` until SIGINT / SIGTERM (blocking), on `sock` if given (bound by `listen`), else on (host, port).

    The exit code, as `uvicorn.run` ends: 0, or 3 when the app failed to start."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, **uvicorn_options(header_timeout_s)
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled, once shut down
        server.run(sockets=None if sock is None else [sock])
    return 0 if server.started else STARTUP_FAILURE
