"""Secure defaults: who may call the server, which origins and hosts it answers, which files it opens.

* Bound to a loopback address the server needs no token; bound to anything else it refuses to start
  without one (`check_bind`). A configured token is checked on every HTTP and WebSocket request (REST,
  WebRTC signalling, static files), in constant time, from `Authorization: Bearer`, the `X-Wanstream-Token`
  header, a `token` query parameter (for `<img>`/`<video>` links; it then sets an HttpOnly cookie so the
  page's own requests carry it) or that cookie.
* CORS is closed: a browser request whose `Origin` is neither the server itself nor a configured
  origin is refused (this also stops other sites from driving a local server), and on a loopback bind
  the `Host` header must name a loopback host (no DNS rebinding).
* Client-given media names are resolved inside the media folder or rejected (`resolve_media_path`);
  uploads are limited in size and must look like a video container (`sniff_video`) or, for VACE's reference
  images, a PNG / JPEG / WebP image (`sniff_image`, at most `MAX_IMAGE_BYTES`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_HEADER = "x-wanstream-token"
TOKEN_COOKIE = "wanstream_token"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})  # VACE reference / first / last frames
MAX_IMAGE_BYTES = 32 * 1024 * 1024
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,127}$")


class SecurityError(ValueError):
    """A request or configuration the security rules refuse; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------
# Binding


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MIN_TOKEN_CHARS = 8


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token: anyone on the network could drive the GPU. A token must
    be usable: header values arrive with surrounding whitespace stripped, so a token with whitespace or
    control characters in it could never match, and a short one is guessable."""
    if token is not None:
        if any(c.isspace() or not c.isprintable() for c in token):
            raise SecurityError(
                "the token contains whitespace or control characters, which a request header cannot carry "
                "intact: use letters and digits (e.g. `openssl rand -hex 16`)"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityError(
                f"the token is too short: use at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 16`)"
            )
    if not is_loopback(host) and not token:
        raise SecurityError(
            f"refusing to listen on {host} without a token: anyone who can reach this address could use "
            "the server. Pass --token (e.g. --token $(openssl rand -hex 16)) or bind to 127.0.0.1."
        )


# ----------------------------------------------------------------------------------------------------
# Request guard (pure ASGI, so it covers HTTP and WebSocket alike)


class RequestGuard:
    """Token, Host and Origin checks in front of the whole app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        bind_host: str,
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.loopback = is_loopback(bind_host)
        self.cors_origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host", "")
        if self.loopback and host and not is_loopback(_host_name(host)):
            await _refuse(scope, send, 403, f"Host {host!r} is not this server (loopback only)")
            return
        origin = headers.get("origin")
        if origin and not self._origin_allowed(origin, host):
            await _refuse(
                scope, send, 403, f"cross-origin requests from {origin} are not allowed (see --cors-origin)"
            )
            return
        if self.token is None:
            await self.app(scope, receive, send)
            return
        given, from_query = _given_token(scope, headers)
        if given is None:
            await _refuse(scope, send, 401, "a token is required: send 'Authorization: Bearer <token>'")
            return
        if not hmac.compare_digest(given.encode(), self.token):
            await _refuse(scope, send, 401, "wrong token")
            return
        if from_query and scope["type"] == "http":
            send = _with_cookie(send, given)
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.cors_origins or "*" in self.cors_origins:
            return True
        parts = urlsplit(origin)
        return bool(parts.netloc) and parts.netloc == host.lower()  # same origin


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _given_token(scope: Scope, headers: dict[str, str]) -> tuple[str | None, bool]:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    if TOKEN_HEADER in headers:
        return headers[TOKEN_HEADER].strip(), False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0], True
    if "cookie" in headers:
        cookie = SimpleCookie()
        try:
            cookie.load(headers["cookie"])
        except Exception:
            return None, False
        if TOKEN_COOKIE in cookie:
            return cookie[TOKEN_COOKIE].value, False
    return None, False


class RedactTokens(logging.Filter):
    """Access-log lines without the token: a `token=` query parameter is replaced by `token=***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "token=" in a for a in record.args):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = redact_query(record.msg)
        return True


_TOKEN_PARAM = re.compile(r"((?:^|[?&;])token=)[^&;\s\"]*", re.IGNORECASE)


def redact_query(text: str) -> str:
    return _TOKEN_PARAM.sub(r"\1***", text)


def _with_cookie(send: Send, token: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            cookie = f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
            message.setdefault("headers", [])
            message["headers"] = [*message["headers"], (b"set-cookie", cookie.encode("latin-1"))]
        await send(message)

    return wrapped


async def _refuse(scope: Scope, send: Send, status: int, reason: str) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting makes the server answer the handshake with HTTP 403.
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        return
    body = json.dumps({"detail": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="wanstream"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------
# Paths and uploads


def resolve_media_path(root: Path | None, name: str) -> Path:
    """`name` (a relative path such as 'clips/dance.mp4') inside the media folder, or SecurityError.

    Only plain names are accepted (letters, digits, space, `._+-`; no hidden parts, no `..`, no absolute
    paths or drive letters), and the resolved path, symlinks followed, must still be inside `root`.
    """
    if root is None:
        raise SecurityError("no media folder is configured: start the server with --media-dir DIR")
    if not name or len(name) > 1024 or "\x00" in name or "\\" in name:
        raise SecurityError(f"invalid media name {name!r}: use a relative name such as 'clip.mp4'")
    pure = PurePosixPath(name)
    if (
        pure.is_absolute()
        or not pure.parts
        or any(not _SAFE_PART.match(part) or part in (".", "..") for part in pure.parts)
    ):
        raise SecurityError(
            f"invalid media name {name!r}: use a relative name inside the media folder such as 'clip.mp4' "
            "(letters, digits, space and ._+- only; no '..' and no absolute paths)"
        )
    base = root.resolve()
    path = (base / pure).resolve()
    if not path.is_relative_to(base) or path == base:
        raise SecurityError(f"{name!r} points outside the media folder")
    return path


def check_video_name(name: str) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        allowed = ", ".join(sorted(VIDEO_SUFFIXES))
        raise SecurityError(f"{name!r} is not a video file name: use one of {allowed}")


def check_image_name(name: str) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        allowed = ", ".join(sorted(IMAGE_SUFFIXES))
        raise SecurityError(f"{name!r} is not an image file name: use one of {allowed}")


def sniff_image(head: bytes) -> str | None:
    """The image format a file's first bytes announce ('png', 'jpeg', 'webp'), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    return None


def sniff_video(head: bytes) -> str | None:
    """The container a file's first bytes announce ('mp4', 'matroska', 'avi'), or None."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "mp4"  # MP4, MOV, M4V
    if len(head) >= 12 and head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mp4"  # old QuickTime files without ftyp
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # MKV, WebM
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    return None
