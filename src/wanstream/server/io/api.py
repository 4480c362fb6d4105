"""Live-rig routes: what this machine offers (`/hardware`), NDI discovery, a session's sinks, and the
live MPEG-TS output (`/sessions/{id}/output.ts`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from wanstream.server.io import hardware, ndi
from wanstream.server.io.mpegts import MpegTsSink
from wanstream.server.io.sinks import SinkUnavailable
from wanstream.server.io.specs import SinkSpec
from wanstream.server.request_body import read_json
from wanstream.server.sessions import Session, SessionManager, SinkExists

router = APIRouter(prefix="/api/v1")
SINK_BODY_BYTES = 4096  # {"kind": ..., "name": ..., "queue": ...}
OPEN_WAIT_S = 15.0  # a second viewer of output.ts waits this long for the first one's encoder to open


def _manager(request: Request) -> SessionManager:
    return request.app.state.sessions


def _session(request: Request, session_id: str) -> Session:
    session = _manager(request).sessions.get(session_id)
    if session is None:
        raise HTTPException(404, f"no session {session_id!r} (it may have ended)")
    session.touched = time.monotonic()
    return session


@router.get("/hardware", tags=["status"])
async def get_hardware() -> dict[str, Any]:
    """The GPU (name, memory) and every input / output kind: available here or not, and why."""
    return await asyncio.to_thread(hardware.hardware)


@router.get("/ndi/sources", tags=["io"])
async def ndi_sources(timeout: Annotated[float, Query(ge=0.1, le=5.0)] = 1.0) -> dict[str, Any]:
    """NDI sources found on the network (mDNS) within `timeout` seconds."""
    try:
        names = await asyncio.to_thread(ndi.discover, timeout)
    except SinkUnavailable as exc:
        raise HTTPException(503, str(exc)) from None
    return {"sources": names}


@router.get("/sessions/{session_id}/sinks", tags=["io"])
async def list_sinks(request: Request, session_id: str) -> list[dict[str, Any]]:
    return [sink.status() for sink in _session(request, session_id).sinks.values()]


@router.post("/sessions/{session_id}/sinks", tags=["io"], status_code=201)
async def add_sink(request: Request, session_id: str) -> dict[str, Any]:
    """Add an output: `{"kind": "ndi", "name": "wanstream"}` (422 with the reason when it cannot run here)."""
    session = _session(request, session_id)
    spec = await read_json(request, SinkSpec, SINK_BODY_BYTES)
    try:
        sink = await _manager(request).add_sink(session, spec)
    except SinkExists as exc:  # a code the studio can tell apart: adding twice is not its error to show
        raise HTTPException(409, {"error": str(exc), "code": "sink_exists"}) from None
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    except SinkUnavailable as exc:
        raise HTTPException(422, str(exc)) from None
    return sink.status()


@router.delete("/sessions/{session_id}/sinks/{sink_id:path}", tags=["io"], status_code=204)
async def remove_sink(request: Request, session_id: str, sink_id: str) -> Response:
    session = _session(request, session_id)
    if sink_id not in session.sinks:
        raise HTTPException(404, f"the session has no sink {sink_id!r}")
    await _manager(request).remove_sink(session, sink_id)
    return Response(status_code=204)


@router.get("/sessions/{session_id}/output.ts", tags=["io"], response_class=StreamingResponse)
async def output_ts(request: Request, session_id: str) -> StreamingResponse:
    """The generated stream live as H.264 in MPEG-TS (ffplay, VLC, OBS media source). The `ts` sink is added
    on the first request; the stream starts at the next keyframe (within about a second)."""
    session = _session(request, session_id)
    sink = session.sinks.get("ts")
    if sink is None:
        try:
            sink = await _manager(request).add_sink(session, SinkSpec(kind="ts"))
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        except SinkUnavailable as exc:
            raise HTTPException(422, str(exc)) from None
    assert isinstance(sink, MpegTsSink)
    deadline = time.monotonic() + OPEN_WAIT_S
    while sink.state == "starting" and time.monotonic() < deadline:  # another request is opening it
        await asyncio.sleep(0.05)
    try:
        client = sink.subscribe(asyncio.get_running_loop())
    except SinkUnavailable as exc:
        raise HTTPException(409, str(exc)) from None

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in client.chunks():
                session.touched = time.monotonic()  # a viewer keeps a headless session alive
                yield chunk
        finally:
            sink.unsubscribe(client)

    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    return StreamingResponse(body(), media_type="video/mp2t", headers=headers)
