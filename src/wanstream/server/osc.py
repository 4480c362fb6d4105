"""OSC control (UDP, default: the HTTP port's number, as Daydream Scope does): live settings, prompts,
pause / reset, the tempo and server-side timeline playback, from TouchDesigner, Max, Ableton or any OSC tool.

Every live update is turned into the JSON a data channel or WebSocket would carry and handed to
`submit_control`, so OSC is validated by exactly the same models, with the same messages, as REST.
Replies go back to the sender's address and port:

    /wanstream/ack   <address> <json>      the update's ack (the JSON the WebSocket sends)
    /wanstream/error <address> <json>      {"type": "error", "error": ..., "details": [...]}

Addresses (docs/control.md has the full table; `/scope/...` is an alias of `/wanstream/...`):

    /wanstream/prompt <text> [<weight>] [<text> [<weight>]]...     new prompts (blended by weight)
    /wanstream/transition <steps> <method> <text> [<weight>]...    blend into them over `steps` chunks
    /wanstream/<setting> <value>...                                any live setting: noise_scale, seed, ...
    /wanstream/reset · /pause · /resume · /control <json> · /ping
    /wanstream/tempo/{bpm,quantum,quantize,link} <value> · /tempo/tap · /tempo/downbeat · /tempo
    /wanstream/timeline/{play,stop} · /timeline/seek <seconds>
    /wanstream/session/<id>/...       the same, for one session (default: the newest running one)
    .../<address>/{beat,bar,now}      land the update on the next beat / downbeat, or at once

Security: UDP has no authentication and its sender address can be forged. The socket listens on the
server's own address: on loopback only unless the server is exposed, and an exposed server (which has a
token) accepts a message only from an allow-listed sender address (`--osc-allow`) or with the token as
its first argument. Anything else is dropped without a reply, so forged packets cannot make the server
send to a third party; replies are bounded in size. Packets over `MAX_PACKET_BYTES` are refused before
they are parsed.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket, ParseError

from wanstream.server.schemas import Control, ErrorBody, describe_validation
from wanstream.server.signaling import MAX_MESSAGE_BYTES, submit_control
from wanstream.server.tempo import LinkUnavailable, TempoUpdate

if TYPE_CHECKING:
    from wanstream.server.sessions import Session, SessionManager

log = logging.getLogger("wanstream.server")

PREFIXES = ("wanstream", "scope")  # /scope/... : Daydream Scope's names, for patches made for it
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES  # the data channel's limit (a UDP datagram holds at most ~64 KiB)
MAX_MESSAGES = 32  # messages of one bundle that are handled (the rest are refused)
MAX_REPLY_BYTES = 4096  # a reply is never much larger than what it answers (no amplification)
LANDING = {"beat": "beat", "bar": "bar", "now": "off"}
Reply = Callable[[str, dict[str, Any]], None]  # (reply address, body)


class OscError(ValueError):
    """A message the OSC layer cannot turn into an update (the reply says why)."""


@dataclass
class OscStats:
    received: int = 0
    refused: int = 0  # unauthorised senders (dropped, no reply)
    errors: int = 0  # replied with an error
    last_sender: str | None = None


@dataclass
class OscServer(asyncio.DatagramProtocol):
    """The OSC endpoint (an asyncio datagram protocol: it runs on the event loop and never waits on the
    engine; updates are queued to the worker and their acks sent when they come)."""

    manager: SessionManager
    token: str | None = None  # required (as the first argument) from senders not in `allow`
    allow: frozenset[str] = frozenset()  # sender addresses trusted without the token
    exposed: bool = False  # listening beyond loopback: the token or the allow-list is required
    stats: OscStats = field(default_factory=OscStats)
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats.received += 1
        trusted = not self.exposed or _ip(addr[0]) in self.allow
        if len(data) > MAX_PACKET_BYTES:
            if trusted:
                self._send(
                    addr,
                    "/wanstream/error",
                    "",
                    _error(f"packet too large ({len(data)} bytes; at most {MAX_PACKET_BYTES})"),
                )
            else:
                self.stats.refused += 1
            return
        try:
            messages = [m.message for m in OscPacket(data).messages]
        except ParseError as exc:
            if trusted:
                self._send(addr, "/wanstream/error", "", _error(f"not an OSC packet: {exc}"))
            else:
                self.stats.refused += 1
            return
        for i, message in enumerate(messages):
            args = list(message.params)
            if not trusted:
                given = args.pop(0) if args and isinstance(args[0], str) else None
                if self.token is None or given is None or not hmac.compare_digest(given, self.token):
                    self.stats.refused += 1
                    continue
            reply: Reply = functools.partial(self._answer, addr, message.address)
            if i >= MAX_MESSAGES:
                reply("/wanstream/error", _error(f"at most {MAX_MESSAGES} messages of a bundle are handled"))
                continue
            self.stats.last_sender = f"{addr[0]}:{addr[1]}"
            try:
                self.handle(message.address, args, reply)
            except OscError as exc:
                reply("/wanstream/error", _error(str(exc)))
            except (
                Exception
            ) as exc:  # a message must never take the endpoint down; the reply says what failed
                log.exception("OSC message %s failed", message.address)
                reply(
                    "/wanstream/error",
                    _error(f"the message could not be handled: {type(exc).__name__}: {exc}"),
                )

    def _answer(self, addr: tuple[str, int], address: str, reply_address: str, body: dict[str, Any]) -> None:
        if body.get("type") == "error":
            self.stats.errors += 1
            reply_address = "/wanstream/error"
        self._send(addr, reply_address, address, body)

    def _send(self, addr: tuple[str, int], reply_address: str, address: str, body: dict[str, Any]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        text = json.dumps(body)
        if len(text) > MAX_REPLY_BYTES:
            keep = {k: body[k] for k in ("type", "id") if k in body}
            text = json.dumps({**keep, "error": str(body.get("error", ""))[:1024], "truncated": True})
        builder = OscMessageBuilder(reply_address)
        builder.add_arg(address[:256])
        builder.add_arg(text)
        self.transport.sendto(builder.build().dgram, addr)

    # -- dispatch ------------------------------------------------------------------------------------
    def handle(self, address: str, args: list[Any], reply: Reply) -> None:
        parts = [p for p in address.split("/") if p]
        if not parts or parts[0] not in PREFIXES:
            raise OscError(f"unknown address {address!r}: addresses start with /wanstream/ (or /scope/)")
        rest = parts[1:]
        session_id = None
        if rest[:1] == ["session"]:
            if len(rest) < 3:
                raise OscError("use /wanstream/session/<id>/<command>")
            session_id, rest = rest[1], rest[2:]
        if rest == ["ping"]:
            reply("/wanstream/pong", {"type": "pong", "sessions": list(self.manager.sessions)})
            return
        if rest[:1] == ["tempo"]:
            self._tempo(rest[1:], args, reply)
            return
        session = self._session(session_id)
        if rest[:1] == ["timeline"]:
            self._timeline(session, rest[1:], args, reply)
            return
        landing = None
        if len(rest) == 2 and rest[1] in LANDING:
            rest, landing = rest[:1], LANDING[rest[1]]
        if len(rest) != 1:
            raise OscError(f"unknown address {address!r} (see docs/control.md)")
        body = control_body(rest[0], args)
        if landing is not None:
            body["quantize"] = landing
        loop = asyncio.get_running_loop()
        submit_control(session, json.dumps(body), lambda b: reply("/wanstream/ack", b), loop)

    def _session(self, session_id: str | None) -> Session:
        sessions = self.manager.sessions
        if session_id is not None:
            session = sessions.get(session_id)
            if session is None:
                raise OscError(f"no session {session_id!r} (it may have ended)")
            return session
        running = [s for s in sessions.values() if s.state == "running"]
        if not running:
            raise OscError("no stream is running: start one (studio or REST) first")
        return running[-1]  # the newest

    def _tempo(self, rest: list[str], args: list[Any], reply: Reply) -> None:
        tempo = self.manager.tempo
        if rest == ["tap"]:
            tempo.tap()
        elif rest == ["downbeat"]:
            tempo.downbeat()
        elif len(rest) == 1 and rest[0] in TempoUpdate.model_fields:
            value = _single(rest[0], args)
            try:
                change = TempoUpdate.model_validate({rest[0]: _decoded(TempoUpdate, rest[0], value)})
                tempo.update(change)
            except ValidationError as exc:
                raise OscError(describe_validation(exc)) from None
            except LinkUnavailable as exc:
                raise OscError(str(exc)) from None
        elif rest:
            raise OscError(
                f"unknown tempo address /tempo/{'/'.join(rest)}: bpm, quantum, quantize, link, tap, downbeat"
            )
        reply("/wanstream/tempo", {"type": "tempo", **tempo.status().model_dump()})

    def _timeline(self, session: Session, rest: list[str], args: list[Any], reply: Reply) -> None:
        player = session.player
        if player is None:
            raise OscError("this session has no timeline: PUT one to /api/v1/sessions/<id>/timeline first")
        if rest == ["play"]:
            player.play(loop=bool(args[0]) if args else None)
        elif rest == ["stop"]:
            player.stop()
        elif rest == ["seek"]:
            value = _single("seek", args)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise OscError("seek takes the position in seconds (a number)")
            try:
                player.seek(float(value))
            except ValueError as exc:
                raise OscError(str(exc)) from None
        elif rest:
            raise OscError(f"unknown timeline address /timeline/{'/'.join(rest)}: play, stop, seek")
        reply("/wanstream/timeline", {"type": "timeline", **player.status().model_dump()})


# ----------------------------------------------------------------------------------------------------
# OSC arguments → the JSON of a live update (validated afterwards, by `parse_control`, as any other)


def control_body(name: str, args: list[Any]) -> dict[str, Any]:
    if name == "control":
        text = _single(name, args)
        if not isinstance(text, str):
            raise OscError("/control takes one argument: the update's JSON text")
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise OscError(f"the message is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise OscError("/control takes a JSON object")
        return body
    if name == "prompt":
        return {"prompts": _prompts(args)}
    if name == "transition":
        if len(args) < 3:
            raise OscError("/transition takes <steps> <method> <text> [<weight>]...")
        steps = _decoded(Control, "", args[0], integer=True)
        return {"prompts": _prompts(args[2:]), "transition": {"steps": steps, "method": args[1]}}
    if name == "reset":
        return {"reset": True}
    if name in ("pause", "resume"):
        return {"paused": name == "pause"}
    if name not in Control.model_fields or name in ("id", "prompts", "transition"):
        raise OscError(
            f"unknown address /{name}: a live setting ({', '.join(settable())}), or prompt, "
            "transition, reset, pause, resume, control"
        )
    if not args:
        raise OscError(f"/{name} needs a value")
    values = [_decoded(Control, name, a) for a in args]
    return {name: values[0] if len(values) == 1 and not _is_list(name) else values}


def _prompts(args: list[Any]) -> list[dict[str, Any]]:
    """<text> [<weight>] [<text> [<weight>]]...: a weight follows its text (1 when left out)."""
    prompts: list[dict[str, Any]] = []
    for arg in args:
        if isinstance(arg, str):
            prompts.append({"text": arg, "weight": 1.0})
        elif isinstance(arg, int | float) and not isinstance(arg, bool) and prompts:
            prompts[-1]["weight"] = float(arg)
        else:
            raise OscError("prompts are <text> [<weight>] [<text> [<weight>]]...: a weight follows its text")
    if not prompts:
        raise OscError("give at least one prompt text")
    return prompts


def _single(name: str, args: list[Any]) -> Any:
    if len(args) != 1:
        raise OscError(f"/{name} takes one argument, got {len(args)}")
    return args[0]


@functools.cache
def _kinds(model: type, name: str) -> frozenset[str]:
    """The JSON types a field accepts (from its schema), to read OSC's few argument types for it."""
    schema = model.model_json_schema()  # type: ignore[attr-defined]
    prop = schema.get("properties", {}).get(name, {})
    options = prop.get("anyOf", [prop])
    kinds = set()
    for option in options:
        if "$ref" in option:
            kinds.add("object")
        kinds.add(option.get("type", "enum" if "enum" in option or "const" in option else "object"))
        if option.get("type") == "array":
            kinds.add("item:" + str(option.get("items", {}).get("type", "")))
    return frozenset(kinds)


def _is_list(name: str) -> bool:
    return "array" in _kinds(Control, name)


def _decoded(model: type, name: str, value: Any, integer: bool = False) -> Any:
    """An OSC argument as the JSON value it stands for. Many OSC tools send every number as a float and
    every switch as 0/1: a whole float is an integer where the field takes integers only, and 0/1 a
    boolean where it takes a boolean. Nothing else is converted: the model's strict validation decides."""
    if isinstance(value, bytes | bytearray):
        raise OscError(f"/{name}: blobs are not accepted")
    kinds = _kinds(model, name) if name else frozenset()
    wants_int = integer or (("integer" in kinds or "item:integer" in kinds) and "number" not in kinds)
    if isinstance(value, float) and wants_int and value.is_integer():
        return int(value)
    wants_bool = "boolean" in kinds
    if wants_bool and not isinstance(value, bool) and isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    return value


def settable() -> list[str]:
    """The live settings an OSC address may name directly (/wanstream/<name> <value>)."""
    return sorted(n for n in Control.model_fields if n not in ("id", "prompts", "transition"))


def _ip(address: str) -> str:
    """An address in one spelling (an IPv4 sender on a dual-stack socket arrives as ::ffff:a.b.c.d)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _error(message: str) -> dict[str, Any]:
    return ErrorBody(error=message).model_dump()


# ----------------------------------------------------------------------------------------------------
# Start-up


async def start_osc(
    manager: SessionManager, host: str, port: int, token: str | None, allow: tuple[str, ...], exposed: bool
) -> tuple[asyncio.DatagramTransport, OscServer]:
    """Listen for OSC on host:port (UDP); raises OSError when the port is taken."""
    protocol = OscServer(manager, token=token, allow=frozenset(_ip(a) for a in allow), exposed=exposed)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, local_addr=(host, port))
    log.info("OSC control on udp://%s:%d%s", host, port, " (token or allow-list required)" if exposed else "")
    return transport, protocol
