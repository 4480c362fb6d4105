"""Limits on what a client sends, checked before any work is done on it.

* Request bodies: a size per route (`body_limit`), read in full before the app sees them (so nothing is
  parsed beyond the limit) and refused with 413; JSON nested deeper than `MAX_JSON_DEPTH` is refused
  with 422 before any parser recurses into it.
* Prompts: at most `MAX_PROMPT_CHARS` characters (no tokenizer can fit more into 512 tokens), then the
  loaded tokenizer's own count against the encoder's text length (`prompt_problem`).
* Images: the header is read first (`check_image_header`); more than `MAX_IMAGE_PIXELS` is refused
  before a single pixel is decoded.
* ICE candidates: only addresses a browser can really have (`candidate_problem`); link-local and
  cloud-metadata addresses, multicast, broadcast and unspecified addresses never reach ICE.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wanstream.engine.components import Components
    from wanstream.server.security import ASGIApp, Message, Receive, Scope, Send

KiB = 1024
MiB = 1024 * KiB
MAX_JSON_DEPTH = 32  # the deepest real body (a timeline's settings) is 5 levels
DEFAULT_BODY_BYTES = 64 * KiB
# Per route (method, path: exact, or a prefix when it ends with "/"): larger bodies get 413 unparsed.
BODY_LIMITS: tuple[tuple[str, str, int], ...] = (
    ("POST", "/api/v1/timeline/", 2 * MiB),  # a timeline file: hours of segments fit in far less
    ("POST", "/api/v1/webrtc/offer", 256 * KiB),  # an SDP (64 KiB at most) + settings and 8 prompts
    ("POST", "/api/v1/sessions", 256 * KiB),  # a headless start: settings and 8 prompts
    ("PUT", "/api/v1/sessions/", 2 * MiB),  # a timeline for the server to play (as a timeline file)
)
MAX_DRAIN_BYTES = 64 * MiB  # an over-long body up to this is read and dropped before the 413 (else: closed)
# Uploads stream to disk under their own limit (--max-upload-mb), checked by the route as they arrive.
STREAMED_ROUTES: tuple[tuple[str, str], ...] = (("PUT", "/api/v1/media/"),)

# A token covers at most a few characters (umT5's longest pieces are well under 16), so a prompt longer
# than this can never fit into the encoder's 512 tokens; refused even where no tokenizer is loaded.
MAX_PROMPT_CHARS = 8192
MAX_PROMPTS_CHARS = 16384  # all prompts of one message: every event-log row and status repeats them
MAX_IMAGE_PIXELS = 4096 * 4096  # reference / first / last frames are resized to the stream anyway
MAX_IMAGE_SIDE = 8192


class LimitExceeded(ValueError):
    """Something a client sent is over a limit; the message names the limit."""


# ----------------------------------------------------------------------------------------------------
# Request bodies


def body_limit(method: str, path: str) -> int | None:
    """The body size limit of a route in bytes (None: the route streams its body under its own limit)."""
    for m, prefix in STREAMED_ROUTES:
        if method == m and path.startswith(prefix):
            return None
    for m, route, limit in BODY_LIMITS:
        if method == m and (path == route or (route.endswith("/") and path.startswith(route))):
            return limit
    return DEFAULT_BODY_BYTES


def json_depth(raw: bytes) -> int:
    """How deeply `raw` nests arrays and objects (brackets inside strings do not count); linear time."""
    a = np.frombuffer(raw, dtype=np.uint8)
    if a.size == 0:
        return 0
    quote = a == 0x22
    backslash = a == 0x5C
    if backslash.any():
        # Backslashes in the run just before each position: an odd run escapes the character.
        index = np.arange(a.size, dtype=np.int32)
        last_other = np.maximum.accumulate(np.where(backslash, np.int32(-1), index))
        run_before = np.zeros(a.size, dtype=np.int32)
        run_before[1:] = index[:-1] - last_other[:-1]
        quote &= run_before % 2 == 0
    outside = np.cumsum(quote) % 2 == 0  # after an even number of quotes: not inside a string
    opens = ((a == 0x7B) | (a == 0x5B)) & outside
    closes = ((a == 0x7D) | (a == 0x5D)) & outside
    depth = np.cumsum(opens.astype(np.int32) - closes.astype(np.int32))
    return int(depth.max())


class BodyLimit:
    """Reads each request body up to its route's limit before the app runs: 413 when over it, 422 when it
    is JSON nested deeper than `MAX_JSON_DEPTH`. Streamed routes (uploads) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["method"], scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            drained = declared <= MAX_DRAIN_BYTES and await _drain(receive)
            reason = f"the request body is {declared} bytes; this route takes at most {limit}"
            await _answer(send, 413, reason, close=not drained)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                drained = await _drain(receive, size) if message.get("more_body", False) else True
                reason = f"the request body is over this route's limit of {limit} bytes"
                await _answer(send, 413, reason, close=not drained)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if (depth := json_depth(raw)) > MAX_JSON_DEPTH:  # every body these routes take is JSON
            await _answer(
                send, 422, f"the JSON is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _drain(receive: Receive, read: int = 0) -> bool:
    """Read and drop the rest of an over-long body (so the client sees the answer instead of a reset);
    False when more than `MAX_DRAIN_BYTES` would have to be read (then the connection is closed)."""
    while read <= MAX_DRAIN_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def _answer(send: Send, status: int, reason: str, close: bool = False) -> None:
    body = json.dumps({"detail": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------
# Prompts


def prompt_problem(components: Components, texts: Sequence[str]) -> str | None:
    """Why one of `texts` cannot be read whole by the text encoder (its token count, with the limit), or
    None. Runs the real tokenizer (CPU, well under a millisecond per prompt of this size)."""
    encoder = components.text_encoder
    if encoder is None or components.demo:
        # The demo's toy tokenizer spells unknown words letter by letter into a 64-token encoder: its count
        # says nothing about what the real model reads, so only the character limits apply there.
        return None
    wrapper = encoder.tokenizer
    limit = wrapper.text_len
    from wanstream.models.text import clean_prompt

    for i, text in enumerate(texts):
        ids = wrapper.tokenizer(clean_prompt(text), add_special_tokens=True)["input_ids"]
        if len(ids) > limit:
            return (
                f"prompts[{i}] is {len(ids)} tokens; the model reads at most {limit} (including the end "
                "token), so the rest would be cut off: shorten it"
            )
    return None


# ----------------------------------------------------------------------------------------------------
# Images


def check_image_header(path: Path) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding it; raises LimitExceeded for an image
    over `MAX_IMAGE_PIXELS` (a decompression bomb: a small file that decodes to gigabytes) and ValueError
    for a file that is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    limits = (
        f"images are limited to {MAX_IMAGE_PIXELS // 10**6} megapixels and {MAX_IMAGE_SIDE} pixels a side"
    )
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own check, far above ours: the size is not returned
        raise LimitExceeded(f"the image is over {2 * Image.MAX_IMAGE_PIXELS} pixels; {limits}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from None
    if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
        raise LimitExceeded(f"the image is {width}×{height}; {limits}")
    return width, height


# ----------------------------------------------------------------------------------------------------
# ICE candidates

# The cloud metadata services' addresses (AWS IPv6; the IPv4 one, 169.254.169.254, is link-local).
_METADATA = frozenset({ipaddress.ip_address("fd00:ec2::254")})


def candidate_problem(host: str, port: int, *, allow_link_local: bool) -> str | None:
    """Why the server must not send ICE checks to host:port (a trickled remote candidate), or None."""
    if not 0 < port < 65536:
        return f"port {port} is not a port a peer listens on"
    if host.endswith(".local"):
        return None  # a browser's mDNS name for its own address (resolved to its LAN address)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{host!r} is not an IP address (or a browser's .local name)"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in _METADATA:
        return f"{address} is a cloud metadata address"
    if address.is_unspecified or address.is_multicast or str(address) == "255.255.255.255":
        return f"{address} is not a peer's address (unspecified, multicast or broadcast)"
    if address.is_link_local and not allow_link_local:
        return (
            f"{address} is link-local (169.254.0.0/16, fe80::/10; cloud metadata services live there): "
            "refused unless the server runs with --ice-allow-link-local"
        )
    return None
