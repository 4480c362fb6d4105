"""WebRTC signalling: SDP offer → answer, trickle ICE, the `parameters` data channel, peer lifetime.

The server answers (it never offers) and gathers its candidates before answering, so a client needs
nothing but the answer; candidates the client trickles later arrive by PATCH. A peer that has not
connected within `ice_timeout_s`, fails, closes, or stays disconnected past `disconnect_grace_s` is
torn down through `SessionManager.close`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aioice.ice
import aioice.stun
from aiortc import (
    RTCConfiguration,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp
from pydantic import ValidationError

from wanstream.engine.settings import StreamSettings
from wanstream.server.limits import candidate_problem
from wanstream.server.schemas import (
    ControlAck,
    ErrorBody,
    IceCandidate,
    OfferAnswer,
    OfferRequest,
    describe_validation,
    parse_control,
    validation_details,
)
from wanstream.server.sessions import Session, SessionManager
from wanstream.server.tracks import PacedOutputTrack, pump_input
from wanstream.server.worker import ControlRejected

log = logging.getLogger("wanstream.server")

MAX_MESSAGE_BYTES = 64 * 1024
MAX_CHANNEL_BUFFER = 1024 * 1024  # replies queued for a data channel's client before it is closed
CHANNEL_LABEL = "parameters"


class SignalingError(ValueError):
    """A bad offer or candidate (HTTP 400); the message says what is wrong."""


DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


def check_offer(sdp: str, mode: str, *, max_candidates: int = 32, allow_link_local: bool = False) -> None:
    """Cheap checks before aiortc parses the offer, so typical mistakes get a plain answer; the offer's own
    candidates pass the same filter as trickled ones (nothing reaches ICE that it must not send to)."""
    if not sdp.lstrip().startswith("v=0"):
        raise SignalingError("the offer is not an SDP description (it must start with 'v=0')")
    lines = [line.strip() for line in sdp.splitlines() if line.strip().startswith("a=candidate:")]
    if len(lines) > max_candidates:
        raise SignalingError(
            f"the offer has {len(lines)} ICE candidates; at most {max_candidates} are accepted"
        )
    for line in lines:
        parse_candidate(line[2:], allow_link_local=allow_link_local)
    session_direction, sections = _media_directions(sdp)
    video = [d or session_direction for kind, d in sections if kind == "video"]
    if not video:
        raise SignalingError(
            "the offer has no video section: add a video transceiver (sendrecv, or recvonly)"
        )
    if mode == "video" and not any(d in ("sendrecv", "sendonly") for d in video):
        raise SignalingError(
            "this stream restyles input video, but the offer sends none: add the camera/file track "
            "(sendrecv), or start a text-mode stream (settings.mode = 'text')"
        )


def _media_directions(sdp: str) -> tuple[str, list[tuple[str, str | None]]]:
    """The session-level direction (default sendrecv) and (kind, direction or None) per m-section."""
    session_direction = "sendrecv"
    sections: list[tuple[str, str | None]] = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            sections.append((line[2:].split(" ", 1)[0], None))
        elif line.startswith("a=") and line[2:] in DIRECTIONS:
            if sections:
                sections[-1] = (sections[-1][0], line[2:])
            else:
                session_direction = line[2:]
    return session_direction, sections


async def answer_offer(
    manager: SessionManager, session: Session, request: OfferRequest, settings: StreamSettings
) -> OfferAnswer:
    """Build the peer for a reserved session and answer the offer (the caller closes it on error)."""
    config = manager.config
    tune_consent(config.peer_timeout_s)
    loop = asyncio.get_running_loop()
    rtc_config = RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in config.ice_servers])
    pc = RTCPeerConnection(rtc_config)
    session.peer = pc

    @pc.on("track")
    def on_track(track: Any) -> None:
        if track.kind == "video":
            # Always drain the remote track (aiortc queues frames without bound when nobody reads them);
            # the worker uses them in video mode only.
            session.spawn(pump_input(track, session.feed), "input")

    @pc.on("datachannel")
    def on_datachannel(channel: Any) -> None:
        if channel.label != CHANNEL_LABEL:
            channel.close()
            return
        session.channel = channel

        @channel.on("message")
        def on_message(raw: str | bytes) -> None:
            submit_control(session, raw, lambda body: _send(channel, body), loop)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        state = pc.connectionState
        if state == "failed":
            await manager.close(session.id, "the WebRTC connection failed", "ice_failed")
        elif state == "closed":
            await manager.close(session.id, "the client closed the connection", "client")
        elif state == "disconnected":
            session.spawn(_disconnect_grace(manager, session, pc), "grace")

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=request.sdp, type="offer"))
    except Exception as exc:  # aiortc raises ValueError, KeyError, IndexError... on bad SDP
        raise SignalingError(f"the offer could not be parsed: {_reason(exc)}") from None
    worker = await manager.start_worker(session, settings, request.prompts)
    output = PacedOutputTrack(worker, loop, capacity=config.output_queue_frames)
    session.output = output
    worker.add_sink(output)
    pc.addTrack(output)
    try:
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:
        raise SignalingError(f"no answer could be made for this offer: {_reason(exc)}") from None
    session.spawn(_ice_watchdog(manager, session, pc, config.ice_timeout_s), "ice-watchdog")
    session.spawn(_poll_rtt(session, pc), "rtt")
    return OfferAnswer(sdp=pc.localDescription.sdp, session_id=session.id)


def parse_candidate(text: str, *, allow_link_local: bool) -> RTCIceCandidate:
    """A remote candidate line, parsed and checked (SignalingError: unparsable, or an address the server
    must not send connectivity checks to, such as a cloud metadata service)."""
    try:
        candidate = candidate_from_sdp(text.removeprefix("candidate:"))
    except Exception as exc:
        raise SignalingError(f"bad ICE candidate {text[:80]!r}: {_reason(exc)}") from None
    problem = candidate_problem(candidate.ip, candidate.port, allow_link_local=allow_link_local)
    if problem is not None:
        raise SignalingError(f"ICE candidate refused: {problem}")
    return candidate


async def add_candidates(
    session: Session, candidates: list[IceCandidate], *, max_candidates: int, allow_link_local: bool
) -> int:
    """Trickled remote candidates: all checked first (a refused one adds none), then handed to ICE."""
    pc = session.peer
    if pc is None:
        raise SignalingError("this session has no WebRTC peer (it is headless)")
    parsed = []
    for c in candidates:
        text = c.candidate.strip()
        if not text:
            continue  # end of candidates
        candidate = parse_candidate(text, allow_link_local=allow_link_local)
        candidate.sdpMid = c.sdpMid
        candidate.sdpMLineIndex = c.sdpMLineIndex
        if c.sdpMid is None and c.sdpMLineIndex is None:
            raise SignalingError("an ICE candidate needs sdpMid or sdpMLineIndex")
        parsed.append(candidate)
    if session.remote_candidates + len(parsed) > max_candidates:
        raise SignalingError(
            f"too many ICE candidates: at most {max_candidates} per session "
            f"({session.remote_candidates} already given)"
        )
    session.remote_candidates += len(parsed)
    added = 0
    for candidate in parsed:
        try:
            await pc.addIceCandidate(candidate)
        except Exception as exc:
            raise SignalingError(f"ICE candidate rejected: {_reason(exc)}") from None
        added += 1
    return added


def submit_control(
    session: Session,
    raw: str | bytes,
    reply: Callable[[dict[str, Any]], None],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Parse and validate one live update, queue it to the worker, reply with its ack or error."""
    if len(raw) > MAX_MESSAGE_BYTES:
        reply(
            ErrorBody(error=f"message too large ({len(raw)} bytes; at most {MAX_MESSAGE_BYTES})").model_dump()
        )
        return
    try:
        message = parse_control(raw)  # the same parser and messages as the REST route
    except ValidationError as exc:
        message_id = _message_id(raw)
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            reply(
                ErrorBody(
                    id=message_id, error=f"the message is not JSON: {exc.errors()[0]['msg']}"
                ).model_dump()
            )
            return
        body = ErrorBody(id=message_id, error=describe_validation(exc), details=validation_details(exc))
        reply(body.model_dump())
        return
    message_id = message.id
    worker = session.worker
    if worker is None:
        reply(ErrorBody(id=message_id, error="the session has not started yet").model_dump())
        return
    future = worker.control(message)

    def done(f: Any) -> None:
        loop.call_soon_threadsafe(reply, control_reply(f, message_id))

    future.add_done_callback(done)


def _message_id(raw: str | bytes) -> str | int | None:
    """The `id` of a message that failed validation, if it has a usable one (to match the error)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def control_reply(future: Any, message_id: str | int | None) -> dict[str, Any]:
    try:
        ack: ControlAck = future.result()
    except ControlRejected as exc:
        return ErrorBody(id=message_id, error=str(exc), details=exc.details).model_dump()
    return ack.model_dump()


def _send(channel: Any, body: dict[str, Any]) -> None:
    if channel.readyState != "open":
        return
    if channel.bufferedAmount > MAX_CHANNEL_BUFFER:
        # A client that sends but never reads its replies: its channel is closed (it sees that), rather
        # than replies being dropped silently or queued without bound.
        log.warning("closing a data channel whose client does not read its replies")
        channel.close()
        return
    channel.send(json.dumps(body))


async def _ice_watchdog(
    manager: SessionManager, session: Session, pc: RTCPeerConnection, timeout: float
) -> None:
    await asyncio.sleep(timeout)
    if pc.connectionState != "connected":
        await manager.close(
            session.id, f"the WebRTC connection was not established within {timeout:g} s", "ice_timeout"
        )


async def _disconnect_grace(manager: SessionManager, session: Session, pc: RTCPeerConnection) -> None:
    await asyncio.sleep(manager.config.disconnect_grace_s)
    if pc.connectionState in ("disconnected", "failed"):
        await manager.close(session.id, "the client disconnected", "client")


async def _poll_rtt(session: Session, pc: RTCPeerConnection, every: float = 2.0) -> None:
    """Keep the session's network round trip current (for the glass-to-glass estimate)."""
    while True:
        await asyncio.sleep(every)
        if pc.connectionState != "connected":
            continue
        report = await pc.getStats()
        for stat in report.values():
            if stat.type == "remote-inbound-rtp" and getattr(stat, "roundTripTime", None):
                session.rtt = float(stat.roundTripTime)


CONSENT_FAILURES = 4  # consecutive unanswered consent checks that end a peer


def tune_consent(peer_timeout_s: float) -> None:
    """Make ICE consent freshness (RFC 7675) notice a dead peer within `peer_timeout_s`.

    aioice checks consent every 5 s and gives up after 6 failures (30 s); a client killed without a
    goodbye would keep its slot that long. Each check waits `RETRY_RTO` (0.5 s) for its answer and the
    pause before it is 0.8–1.2 × the interval, so CONSENT_FAILURES × (1.2 × interval + RTO) is the
    longest a dead peer is kept. (aioice reads these per check, for every connection of this process.)"""
    rto = aioice.stun.RETRY_RTO
    interval = (peer_timeout_s / CONSENT_FAILURES - rto) / 1.2
    aioice.ice.CONSENT_INTERVAL = max(0.1, interval)
    aioice.ice.CONSENT_FAILURES = CONSENT_FAILURES


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
