"""Routes for live-rig control: the server's tempo (BPM, bar, quantisation, tap, Ableton Link), timelines
the server plays to a session, and what the OSC endpoint listens on (with its address table).

    GET  /api/v1/tempo            PUT /api/v1/tempo {bpm, quantum, quantize, link}
    POST /api/v1/tempo/tap        POST /api/v1/tempo/downbeat
    PUT  /api/v1/sessions/{id}/timeline      body: the studio's timeline form (see timeline_api)
    GET  /api/v1/sessions/{id}/timeline      POST .../timeline/play?loop=  .../stop  .../seek?t=
    GET  /api/v1/osc
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from wanstream.server.api import _session
from wanstream.server.osc import PREFIXES, settable
from wanstream.server.playback import PlayerStatus, TimelinePlayer
from wanstream.server.tempo import LinkUnavailable, TempoStatus, TempoUpdate
from wanstream.server.timeline_api import StudioTimeline, _problems, from_studio
from wanstream.timeline import TimelineError

router = APIRouter(prefix="/api/v1")


def _tempo(request: Request) -> Any:
    return request.app.state.sessions.tempo


@router.get("/tempo", tags=["tempo"])
async def tempo_status(request: Request) -> TempoStatus:
    return _tempo(request).status()


@router.put("/tempo", tags=["tempo"])
async def tempo_update(request: Request, body: TempoUpdate) -> TempoStatus:
    """Change the tempo; `quantize` 'beat' or 'bar' makes prompt changes and timeline segments land on the
    chunk nearest the next beat or downbeat. `link: true` follows Ableton Link (the 'link' extra)."""
    try:
        _tempo(request).update(body)
    except LinkUnavailable as exc:
        raise HTTPException(422, str(exc)) from None
    return _tempo(request).status()


@router.post("/tempo/tap", tags=["tempo"])
async def tempo_tap(request: Request) -> TempoStatus:
    """One tap of tap tempo: two taps or more within 2 s of each other set the BPM (their mean interval);
    the first tap of a series is a downbeat."""
    _tempo(request).tap()
    return _tempo(request).status()


@router.post("/tempo/downbeat", tags=["tempo"])
async def tempo_downbeat(request: Request) -> TempoStatus:
    """Now is the start of a bar."""
    _tempo(request).downbeat()
    return _tempo(request).status()


# ----------------------------------------------------------------------------------------------------
# Server-side timeline playback


def _player(request: Request, session_id: str) -> TimelinePlayer:
    player = _session(request, session_id).player
    if player is None:
        raise HTTPException(404, "this session has no timeline: PUT one to .../timeline first")
    return player


@router.put("/sessions/{session_id}/timeline", tags=["timeline"])
async def timeline_load(request: Request, session_id: str, body: StudioTimeline) -> PlayerStatus:
    """Give the session a timeline to play (replacing and stopping the one it had); play it over REST or
    OSC (`/wanstream/timeline/play`). The player sends the segments (prompts, transitions, VACE scale); the
    timeline's `settings` are not applied (send them as a live update if the stream should take them)."""
    session = _session(request, session_id)
    if session.worker is None:
        raise HTTPException(409, "the session has not started yet")
    try:
        timeline = from_studio(body)
    except TimelineError as exc:
        raise HTTPException(422, _problems(exc)) from None
    if session.player is not None:
        session.player.stop()
    session.player = TimelinePlayer(timeline, session.worker, session.spawn)
    return session.player.status()


@router.get("/sessions/{session_id}/timeline", tags=["timeline"])
async def timeline_status(request: Request, session_id: str) -> PlayerStatus:
    return _player(request, session_id).status()


@router.post("/sessions/{session_id}/timeline/play", tags=["timeline"])
async def timeline_play(
    request: Request, session_id: str, loop: Annotated[bool | None, Query()] = None
) -> PlayerStatus:
    player = _player(request, session_id)
    player.play(loop=loop)
    return player.status()


@router.post("/sessions/{session_id}/timeline/stop", tags=["timeline"])
async def timeline_stop(request: Request, session_id: str) -> PlayerStatus:
    player = _player(request, session_id)
    player.stop()
    return player.status()


@router.post("/sessions/{session_id}/timeline/seek", tags=["timeline"])
async def timeline_seek(
    request: Request, session_id: str, t: Annotated[float, Query(ge=0, allow_inf_nan=False)]
) -> PlayerStatus:
    player = _player(request, session_id)
    player.seek(t)
    return player.status()


# ----------------------------------------------------------------------------------------------------
# OSC


@router.get("/osc", tags=["tempo"])
async def osc_info(request: Request) -> dict[str, Any]:
    """Where OSC listens, how senders are admitted, what it has received, and its addresses."""
    state = request.app.state
    server = getattr(state, "osc", None)
    config = state.config
    info: dict[str, Any] = {
        "enabled": server is not None,
        "host": config.host,
        "port": state.osc_port,
        "error": getattr(state, "osc_error", None),
        "auth": "allow-list or token (first argument)"
        if server is not None and server.exposed
        else "loopback",
        "prefixes": [f"/{p}" for p in PREFIXES],
        "settings": settable(),
    }
    if server is not None:
        info["stats"] = vars(server.stats)
    return info
