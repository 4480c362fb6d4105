"""REST routes (`/api/v1/...`), `/health`, `/metrics` and the session WebSocket.

Errors are JSON `{"detail": "..."}` with the status saying who must act: 400 bad request (SDP, names),
401 token, 404 unknown session, 409 busy / already, 413 too large, 415 not a video, 422 invalid values
(with the validation messages), 503 model not loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import ValidationError

from wanstream.engine.estimate import preflight
from wanstream.engine.settings import SettingsUpdate, StreamSettings
from wanstream.engine.vace import VaceInputError
from wanstream.media.images import read_image
from wanstream.media.video import VideoError, probe_video
from wanstream.server import metrics
from wanstream.server.cost import TooSlow
from wanstream.server.io import hardware
from wanstream.server.io.attach import attach_sinks
from wanstream.server.io.ndi import NdiSource
from wanstream.server.io.sinks import SinkUnavailable
from wanstream.server.limits import LimitExceeded, check_image_header, prompt_problem
from wanstream.server.model import ModelBusy, ModelManager
from wanstream.server.recording import encode_jpeg
from wanstream.server.replays import ReplayJob, ReplayJobs, ReplayRefused, ReplayRequest
from wanstream.server.schemas import (
    Control,
    ControlAck,
    ErrorBody,
    HeadlessRequest,
    IcePatch,
    LoadRequest,
    ModelStatus,
    OfferAnswer,
    OfferRequest,
    RecordingInfo,
    RecordingRequest,
    SessionCreated,
    StreamRequest,
    describe_validation,
    parse_control,
    validation_details,
)
from wanstream.server.security import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_BYTES,
    VIDEO_SUFFIXES,
    SecurityError,
    check_video_name,
    resolve_media_path,
    sniff_image,
    sniff_video,
)
from wanstream.server.sessions import (
    Busy,
    NotReady,
    Recording,
    Session,
    SessionManager,
    SessionNotFound,
)
from wanstream.server.signaling import (
    SignalingError,
    add_candidates,
    answer_offer,
    check_offer,
    submit_control,
)
from wanstream.server.sources import FileSource
from wanstream.server.takes import LogResponse
from wanstream.server.vace import VaceRefused, VaceSetup
from wanstream.server.vace import prepare as prepare_vace
from wanstream.server.worker import ControlRejected, missing_codec
from wanstream.weights.lora import LoraError, resolve_lora_path
from wanstream.weights.lora_library import read_provenance
from wanstream.weights.store import lora_files

log = logging.getLogger("wanstream.server")
router = APIRouter()
v1 = APIRouter(prefix="/api/v1")
WS_PENDING = 64  # replies a session WebSocket may owe before the server stops reading it


def _manager(request: Request | WebSocket) -> SessionManager:
    return request.app.state.sessions


def _model(request: Request) -> ModelManager:
    return request.app.state.model


def _replays(request: Request) -> ReplayJobs:
    return request.app.state.replays


def _session(request: Request | WebSocket, session_id: str) -> Session:
    try:
        session = _manager(request).get(session_id)
    except SessionNotFound:
        raise HTTPException(404, f"no session {session_id!r} (it may have ended)") from None
    session.touched = time.monotonic()  # headless sessions live while someone talks to them
    return session


# ----------------------------------------------------------------------------------------------------
# Health, metrics, model


@router.get("/health", tags=["status"])
async def health(request: Request) -> dict[str, Any]:
    manager = _manager(request)
    model = _model(request).status()
    return {
        "status": "ok",
        "model": model.state,
        "demo": model.demo,  # the tiny random-weight demo model (set from start-up, before it loads)
        "random_weights": model.random_weights,  # full-size networks, RANDOM weights (serve --random-weights)
        "sessions": len(manager.sessions),
        "replays": len(manager.held_slots),  # takes replaying on the server: each holds a stream slot
        "max_sessions": manager.config.max_sessions,
        "instance": request.app.state.instance,  # new on every server start
        "started": request.app.state.started,
        "hardware": hardware.summary(),  # the GPU and the I/O available here (GET /api/v1/hardware: why not)
    }


@router.get("/metrics", tags=["status"], response_class=PlainTextResponse)
async def prometheus(request: Request) -> Response:
    text = metrics.render(_manager(request), _model(request))
    return Response(text, media_type=metrics.CONTENT_TYPE)


@v1.get("/model", tags=["model"])
async def model_status(request: Request) -> ModelStatus:
    return _model(request).status()


@v1.post("/model/load", tags=["model"], status_code=202)
async def model_load(request: Request, body: LoadRequest) -> ModelStatus:
    """Start loading in the background (returns at once); poll GET /api/v1/model for progress."""
    if _manager(request).sessions or _manager(request).held_slots:
        raise HTTPException(409, "streams or replays are running: stop them before loading another model")
    try:
        _model(request).start_load(demo=body.demo, precision=body.precision)
    except ModelBusy as exc:
        raise HTTPException(409, str(exc)) from None
    return _model(request).status()


@v1.get("/settings/schema", tags=["model"])
async def settings_schema(request: Request) -> dict[str, Any]:
    """The JSON schema of stream settings (with descriptions for tooltips) and this server's defaults."""
    defaults: dict[str, Any] | None = None
    if _model(request).pipeline is not None:
        defaults = _manager(request).resolve_settings(None).model_dump(mode="json")
    return {
        "schema": StreamSettings.model_json_schema(),
        "control": Control.model_json_schema(),
        "defaults": defaults,
    }


@v1.get("/debug/resources", tags=["status"])
async def debug_resources() -> dict[str, Any]:
    """Threads, asyncio tasks, memory, file handles and GPU memory (what a leak would show)."""
    return metrics.resources()


# ----------------------------------------------------------------------------------------------------
# WebRTC


@v1.get("/webrtc/ice-servers", tags=["webrtc"])
async def ice_servers(request: Request) -> dict[str, Any]:
    return {"iceServers": [{"urls": u} for u in _manager(request).config.ice_servers]}


@v1.post("/webrtc/offer", tags=["webrtc"], responses={409: {"description": "busy"}})
async def webrtc_offer(request: Request, body: OfferRequest) -> OfferAnswer:
    """Start a stream: SDP offer in, SDP answer out (with all server candidates); data channel `parameters`."""
    manager = _manager(request)
    settings = _settings(manager, body.settings)
    _check_prompts(manager, body)
    try:
        check_offer(
            body.sdp,
            settings.mode,
            max_candidates=manager.config.max_ice_candidates,
            allow_link_local=manager.config.ice_allow_link_local,
        )
    except SignalingError as exc:
        raise HTTPException(400, str(exc)) from None
    requested = body.settings.model_dump(exclude_unset=True) if body.settings is not None else {}
    settings, vace = await asyncio.to_thread(_vace, manager, body, settings, requested)  # reads images
    session = _reserve(manager, "webrtc")
    session.vace = vace
    try:
        answer = await answer_offer(manager, session, body, settings)
        await attach_sinks(manager, session, body.sinks)
        return answer
    except BaseException as exc:
        await manager.close(session.id, f"signalling failed: {exc}", "error")
        raise _http_error(exc) from None


@v1.patch("/webrtc/offer/{session_id}", tags=["webrtc"], status_code=204)
async def webrtc_candidates(request: Request, session_id: str, body: IcePatch) -> Response:
    """Trickle ICE: the client's candidates, as they are found."""
    session = _session(request, session_id)
    try:
        config = _manager(request).config
        await add_candidates(
            session,
            body.candidates,
            max_candidates=config.max_ice_candidates,
            allow_link_local=config.ice_allow_link_local,
        )
    except SignalingError as exc:
        raise HTTPException(400, str(exc)) from None
    return Response(status_code=204)


@v1.delete("/webrtc/offer/{session_id}", tags=["webrtc"], status_code=204)
async def webrtc_close(request: Request, session_id: str) -> Response:
    return await delete_session(request, session_id)


# ----------------------------------------------------------------------------------------------------
# Sessions (WebRTC and headless)


@v1.get("/sessions", tags=["sessions"])
async def list_sessions(request: Request) -> list[dict[str, Any]]:
    return [_describe(s) for s in _manager(request).sessions.values()]


@v1.post("/sessions", tags=["sessions"], status_code=201, responses={409: {"description": "busy"}})
async def start_headless(request: Request, body: HeadlessRequest) -> SessionCreated:
    """A stream without WebRTC: from a video in the media folder, an NDI source, or text mode. Fetch frames
    from `/sessions/{id}/frame.jpg` or `/sessions/{id}/output.ts`, send them to sinks, record, control,
    then DELETE."""
    session = await open_headless(_manager(request), body)
    return SessionCreated(session_id=session.id)


async def open_headless(
    manager: SessionManager, body: HeadlessRequest, *, idle_watch: bool = True
) -> Session:
    """Start a headless session (HTTPException with the reason when it cannot). `idle_watch`: end it when
    nobody has asked about it for --idle-timeout (off for the server's own --ndi-in session)."""
    source_path = None
    if body.source == "file":
        assert body.file is not None
        try:
            source_path = resolve_media_path(manager.config.media_dir, body.file)
            check_video_name(body.file)
        except SecurityError as exc:
            raise HTTPException(400, str(exc)) from None
        if not source_path.is_file():
            raise HTTPException(
                404, f"no video {body.file!r} in the media folder (GET /api/v1/media lists them)"
            )
    mode = "text" if body.source == "text" else "video"
    requested = body.settings.model_dump(exclude_unset=True) if body.settings is not None else {}
    if requested.setdefault("mode", mode) != mode:
        raise HTTPException(
            422, f"source {body.source!r} needs settings.mode {mode!r}, not {requested['mode']!r}"
        )
    settings = _settings(manager, SettingsUpdate.model_validate(requested))
    _check_prompts(manager, body)
    settings, vace = await asyncio.to_thread(_vace, manager, body, settings, requested)  # reads images
    session = _reserve(manager, "headless")
    session.vace = vace
    try:
        if source_path is not None:
            source = await asyncio.to_thread(
                FileSource, source_path, session.feed, loop=body.loop, name=session.id
            )
            session.source, session.source_label = source, body.file or ""
        elif body.ndi is not None:
            ndi_in = body.ndi
            session.source = await asyncio.to_thread(
                NdiSource, session.feed, name=ndi_in.name, address=ndi_in.address, label=session.id
            )
            session.source_label = ndi_in.label
        else:
            session.source_label = "text"
        await manager.start_worker(session, settings, body.prompts)
        await attach_sinks(manager, session, body.sinks)
        if session.source is not None:
            session.source.start()
            session.spawn(_watch_source(manager, session), "source-watch")
        if idle_watch:
            session.spawn(_idle_watchdog(manager, session), "idle-watch")
    except BaseException as exc:
        await manager.close(session.id, f"start failed: {exc}", "error")
        raise _http_error(exc) from None
    return session


@v1.get("/sessions/{session_id}", tags=["sessions"])
async def session_status(request: Request, session_id: str) -> dict[str, Any]:
    return _describe(_session(request, session_id), details=True)


@v1.delete("/sessions/{session_id}", tags=["sessions"], status_code=204)
async def delete_session(request: Request, session_id: str) -> Response:
    session = _session(request, session_id)
    await _manager(request).close(session.id, "stopped by the client (DELETE)", "deleted")
    return Response(status_code=204)


@v1.post("/sessions/{session_id}/close", tags=["sessions"], status_code=204)
async def close_session(request: Request, session_id: str) -> Response:
    """The same as DELETE, for `navigator.sendBeacon` when a tab closes."""
    return await delete_session(request, session_id)


@v1.post("/sessions/{session_id}/control", tags=["sessions"], responses={422: {"description": "rejected"}})
async def control(request: Request, session_id: str) -> ControlAck:
    """The data channel's live updates over REST: validated, applied between chunks, acknowledged."""
    session = _session(request, session_id)
    raw = await request.body()
    try:
        message = parse_control(raw)
    except ValidationError as exc:
        raise HTTPException(
            422, {"error": describe_validation(exc), "details": validation_details(exc)}
        ) from None
    if session.worker is None:
        raise HTTPException(409, "the session has not started yet")
    try:
        return await asyncio.wrap_future(session.worker.control(message))
    except ControlRejected as exc:
        raise HTTPException(422, {"error": str(exc), "details": exc.details}) from None


@v1.get("/sessions/{session_id}/events", tags=["sessions"])
async def session_events(
    request: Request, session_id: str, since: Annotated[int, Query(ge=-1)] = -1
) -> list[dict[str, Any]]:
    """The event log: one row per generated chunk (prompt in force, frames, timesteps, noise) and per
    applied update; `since` = the last `seq` seen."""
    session = _session(request, session_id)
    return session.worker.event_log(since) if session.worker is not None else []


@v1.get("/sessions/{session_id}/frame.jpg", tags=["sessions"], response_class=Response)
async def latest_frame(
    request: Request, session_id: str, quality: Annotated[int, Query(ge=1, le=100)] = 85
) -> Response:
    """The most recent generated frame as JPEG (503 until the first one, and right after a restart)."""
    session = _session(request, session_id)
    frame = session.worker.latest() if session.worker is not None else None
    if frame is None:
        raise HTTPException(503, "no frame yet", headers={"Retry-After": "1"})
    data = await asyncio.to_thread(encode_jpeg, frame.image, quality)
    headers = {
        "Cache-Control": "no-store",
        "X-Wanstream-Chunk": str(frame.chunk),
        "X-Wanstream-Epoch": str(frame.epoch),
    }
    return Response(data, media_type="image/jpeg", headers=headers)


# ----------------------------------------------------------------------------------------------------
# Recording


@v1.post("/sessions/{session_id}/recording/start", tags=["recording"], status_code=201)
async def recording_start(
    request: Request, session_id: str, body: RecordingRequest | None = None
) -> RecordingInfo:
    session = _session(request, session_id)
    try:
        recording = _manager(request).start_recording(session, body.include_input if body else False)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    return _recording_info(session.id, recording)


@v1.post("/sessions/{session_id}/recording/stop", tags=["recording"])
async def recording_stop(request: Request, session_id: str) -> RecordingInfo:
    session = _session(request, session_id)
    try:
        recording = await _manager(request).stop_recording(session)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    return _recording_info(session.id, recording)


@v1.get("/sessions/{session_id}/recording", tags=["recording"])
async def recording_status(request: Request, session_id: str) -> RecordingInfo:
    recording = _manager(request).recording_for(session_id)
    if recording is None:
        raise HTTPException(404, f"no recording for session {session_id!r}")
    return _recording_info(session_id, recording)


@v1.get("/sessions/{session_id}/recording/{which}.mp4", tags=["recording"], response_class=FileResponse)
async def recording_download(request: Request, session_id: str, which: str) -> FileResponse:
    """Download the recorded output (`output.mp4`) or input (`input.mp4`) once recording has stopped."""
    recording = _manager(request).recording_for(session_id)
    if recording is None:
        raise HTTPException(404, f"no recording for session {session_id!r}")
    if which not in ("output", "input"):
        raise HTTPException(404, "recordings are output.mp4 and input.mp4")
    if recording.stopped is None:
        raise HTTPException(409, "still recording: POST .../recording/stop first")
    path = recording.output_path if which == "output" else recording.input_path
    if path is None or not path.is_file():
        raise HTTPException(
            404, f"no {which} recording (nothing was recorded, or the input was not included)"
        )
    return FileResponse(path, media_type="video/mp4", filename=f"wanstream-{session_id}-{which}.mp4")


# ----------------------------------------------------------------------------------------------------
# Session logs (docs/replay.md)


@v1.get("/sessions/{session_id}/log", tags=["recording"], response_class=LogResponse, status_code=200)
async def session_log(
    request: Request,
    session_id: str,
    take: Annotated[
        Literal["stream", "recording"],
        Query(description="where the take starts: the stream's first frame, or the recording's"),
    ] = "stream",
) -> LogResponse:
    """The stream's session log so far (also after it ended): one `.wslog` file that `wanstream replay`
    reproduces bit for bit. `take=recording`: the replay writes from the recording's first frame on. It is
    written as it is sent (no Content-Length); a failure to read it mid-way breaks the download off."""
    manager = _manager(request)
    found = manager.take_for(session_id)
    if found is None:
        raise HTTPException(
            404, f"no session log for session {session_id!r} (the server runs with --take-log-mib 0?)"
        )
    first = 0
    if take == "recording":
        recording = manager.recording_for(session_id)
        if recording is None or recording.output.first_index is None:
            raise HTTPException(
                409, "this session has no recording with frames yet: record first, or use take=stream"
            )
        first = recording.output.first_index
    pipeline = manager.model.pipeline
    if pipeline is None:
        raise HTTPException(503, "the model is not loaded")
    try:  # what can fail before the first byte is an HTTP error; later, it can only break the download off
        stream = await asyncio.to_thread(found.log_stream, pipeline.components, first)
    except OSError as exc:
        raise HTTPException(500, f"the session log could not be read: {exc}") from None
    return LogResponse(stream, f"wanstream-{found.session_id}.wslog")


@v1.post(
    "/sessions/{session_id}/replay",
    tags=["recording"],
    status_code=202,
    responses={404: {"description": "no such take"}, 409: {"description": "busy, or no recording"}},
)
async def replay_start(
    request: Request, session_id: str, body: ReplayRequest | None = None
) -> dict[str, Any]:
    """Replay the session's take on the server, on the networks the stream ran on (also after it ended):
    a job to poll at `GET /api/v1/replays/{job}`. It takes a stream slot while it runs (409 when none is
    free). `take`: from the recording's first frame (the default when there is a stopped recording), or
    the stream's."""
    try:
        job = _replays(request).start(session_id, body.take if body is not None else None)
    except ReplayRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except Busy as exc:
        raise HTTPException(409, str(exc)) from None
    except NotReady as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
    return job.view()


@v1.get("/replays/{job_id}", tags=["recording"])
async def replay_status(request: Request, job_id: str) -> dict[str, Any]:
    """A replay's state (queued, running, done, failed, cancelled), progress in calls, and when done its
    report: frames compared with the live stream's, how many are identical bit for bit, and `summary`."""
    return _replay_job(request, job_id).view()


@v1.get("/replays/{job_id}/replay.mp4", tags=["recording"], response_class=FileResponse)
async def replay_video(request: Request, job_id: str) -> FileResponse:
    """The replayed take as H.264, from the take's first frame; encoded as the recording was, so a
    bit-exact replay of a recording is the same file as its output.mp4."""
    job = _replay_job(request, job_id)
    if job.state != "done":
        raise HTTPException(409, f"the replay is {job.state}" + (f": {job.error}" if job.error else ""))
    if job.frames_written == 0 or not job.video.is_file():
        raise HTTPException(404, "the replay made no frames from the take's start")
    return FileResponse(job.video, media_type="video/mp4", filename=f"wanstream-{job.session_id}-replay.mp4")


@v1.delete("/replays/{job_id}", tags=["recording"], status_code=204)
async def replay_remove(request: Request, job_id: str) -> Response:
    """Cancel a replay (its stream slot is free once its current call ends) and remove it and its files."""
    if not _replays(request).remove(job_id):
        raise HTTPException(404, f"no replay {job_id!r} (finished ones are kept a while, then removed)")
    return Response(status_code=204)


def _replay_job(request: Request, job_id: str) -> ReplayJob:
    job = _replays(request).get(job_id)
    if job is None:
        raise HTTPException(404, f"no replay {job_id!r} (finished ones are kept a while, then removed)")
    return job


# ----------------------------------------------------------------------------------------------------
# Media folder


@v1.get("/media", tags=["media"])
async def list_media(
    request: Request, kind: Annotated[Literal["video", "image", "all"], Query()] = "video"
) -> list[dict[str, Any]]:
    """Files of the media folder: videos (headless sources, VACE control), or images (VACE references)."""
    root = _manager(request).config.media_dir
    if root is None:
        return []
    suffixes = {"video": VIDEO_SUFFIXES, "image": IMAGE_SUFFIXES, "all": VIDEO_SUFFIXES | IMAGE_SUFFIXES}[
        kind
    ]
    base = root.resolve()
    found = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base).as_posix()
        hidden = any(part.startswith(".") for part in Path(rel).parts)
        if path.is_file() and path.suffix.lower() in suffixes and not hidden:
            what = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
            found.append({"name": rel, "bytes": path.stat().st_size, "kind": what})
    return found


@v1.get("/loras", tags=["media"])
async def list_loras(request: Request) -> list[dict[str, Any]]:
    """LoRA files in the server's LoRA folder (--lora-dir): the names `loras[].path` accepts, each with where
    it came from when it was added by link (`provenance`: source, sha256, date, trigger words; else null)."""
    root = _manager(request).config.lora_dir
    if root is None:
        return []
    base, files = lora_files(root)
    assert base is not None
    found = []
    inside = base.resolve()
    for path in files:
        rel = path.relative_to(base).as_posix()
        hidden = any(part.startswith(".") for part in Path(rel).parts)
        if not hidden and path.resolve().is_relative_to(inside):  # links out of the folder are not offered
            found.append({"name": rel, "bytes": path.stat().st_size, "provenance": read_provenance(path)})
    return found


@v1.put("/media/{name:path}", tags=["media"], status_code=201)
async def upload_media(
    request: Request, name: str, overwrite: Annotated[bool, Query()] = False
) -> dict[str, Any]:
    """Upload a video (`Content-Type: video/*`) or a VACE reference image (PNG / JPEG / WebP, `image/*`, at
    most 32 MiB) into the media folder: the raw file as the request body."""
    config = _manager(request).config
    image = PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
    try:
        target = resolve_media_path(config.media_dir, name)
        if not image:
            check_video_name(name)
    except SecurityError as exc:
        raise HTTPException(
            400, f"{exc} (or, for an image, one of {', '.join(sorted(IMAGE_SUFFIXES))})"
        ) from None
    kind = "image" if image else "video"
    sniff = sniff_image if image else sniff_video
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and not (
        content_type.startswith(f"{kind}/") or content_type == "application/octet-stream"
    ):
        raise HTTPException(415, f"{name!r} must be sent as {kind}/* (by its name), got {content_type!r}")
    limit = min(config.max_upload_bytes, MAX_IMAGE_BYTES) if image else config.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the file is {int(declared)} bytes; uploads are limited to {limit} bytes")
    if target.exists() and not overwrite:
        raise HTTPException(409, f"{name!r} already exists (add ?overwrite=true to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.upload")
    size = 0
    head = b""
    try:
        with open(tmp, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"the file is larger than the upload limit ({limit} bytes)")
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                    if len(head) >= 16 and sniff(head) is None:
                        raise HTTPException(415, f"{name!r} is not a {kind} file (unknown signature)")
                f.write(chunk)
        if size == 0:
            raise HTTPException(400, "the upload is empty")
        if sniff(head) is None:
            raise HTTPException(415, f"{name!r} is not a {kind} file (unknown signature)")
        try:
            described = await asyncio.to_thread(_probe_upload, tmp, image)
        except LimitExceeded as exc:
            raise HTTPException(413, f"{name!r}: {exc}") from None
        except (VideoError, VaceInputError, ValueError):
            raise HTTPException(415, f"{name!r} is not a readable {kind} (it does not decode)") from None
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": name, "bytes": size, "kind": kind, **described}


def _probe_upload(path: Path, image: bool) -> dict[str, Any]:
    if image:
        check_image_header(path)  # the pixel count from the header, before anything is decoded
        height, width = read_image(path).shape[:2]
        return {"width": width, "height": height}
    info = probe_video(path)
    return {"width": info.width, "height": info.height, "fps": info.fps}


# ----------------------------------------------------------------------------------------------------
# WebSocket: live control and status for scripts


@v1.websocket("/sessions/{session_id}/ws")
async def session_socket(websocket: WebSocket, session_id: str) -> None:
    """Send the same JSON as the data channel, get acks/errors back; a status message every second.

    Every message gets its reply. At most `WS_PENDING` replies are outstanding per socket: beyond that
    the server stops reading the socket until replies have gone out (back-pressure through TCP), so no
    reply is ever dropped. Binary frames are answered with an error; the stream is not affected."""
    manager = _manager(websocket)
    session = manager.sessions.get(session_id)
    await websocket.accept()  # accept first: closing before it would read as a refused handshake (403)
    if session is None:
        await websocket.close(code=4404, reason="no such session")
        return
    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # bounded by `room`: one entry per message read
    room = asyncio.Semaphore(WS_PENDING)

    def reply(body: dict[str, Any]) -> None:
        outbox.put_nowait(body)

    async def sender() -> None:
        while True:
            try:
                body = await asyncio.wait_for(outbox.get(), 1.0)
            except TimeoutError:
                session.touched = time.monotonic()  # an open socket is someone watching
                await websocket.send_text(json.dumps({"type": "status", **_describe(session)}))
                continue
            await websocket.send_text(json.dumps(body))
            room.release()

    send_task = asyncio.create_task(sender())
    try:
        while session.state != "closed":
            await room.acquire()  # a reply slot for the next message, before reading it
            receive = asyncio.create_task(websocket.receive())
            closed = asyncio.create_task(session.closed.wait())
            done, pending = await asyncio.wait(
                {receive, closed, send_task}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending - {send_task}:
                task.cancel()
            if receive not in done:
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                reply(
                    ErrorBody(
                        error="binary frames are not accepted: send each update as JSON in a text frame"
                    ).model_dump()
                )
                continue
            submit_control(session, text, reply, loop)
    except WebSocketDisconnect:
        pass
    finally:
        send_task.cancel()
        await asyncio.gather(send_task, return_exceptions=True)
        with contextlib.suppress(Exception):
            if session.state == "closed":  # only when the stream really ended (not when the client left)
                await websocket.send_text(
                    json.dumps({"type": "stream_stopped", "reason": session.close_reason})
                )
            await websocket.close()


# ----------------------------------------------------------------------------------------------------
# Helpers


def _settings(manager: SessionManager, update: SettingsUpdate | None) -> StreamSettings:
    """A new stream's settings: 503 without a model, 422 with the reason when the values do not fit."""
    if manager.model.pipeline is None:
        raise HTTPException(503, manager.model.not_ready_reason(), headers={"Retry-After": "5"})
    try:
        settings = manager.resolve_settings(update)
    except ValidationError as exc:
        raise HTTPException(
            422, {"error": describe_validation(exc), "details": validation_details(exc)}
        ) from None
    problem = missing_codec(manager.model.pipeline.components, settings)
    if problem is not None:
        raise HTTPException(422, problem)
    try:
        manager.cost.check(settings)  # before anything is allocated: a chunk must fit in real time here
    except TooSlow as exc:
        raise HTTPException(422, str(exc)) from None
    pipeline = manager.model.pipeline
    if pipeline.ring is None:  # and in memory (an estimate from measured rows, or the exact KV cache)
        fit = preflight(pipeline.components, settings, rows=manager.estimate_rows)
        if fit.level == "refuse":
            raise HTTPException(422, fit.message)
        if fit.message:
            log.log(logging.WARNING if fit.level == "warn" else logging.INFO, "new stream: %s", fit.message)
    for lora in settings.loras:  # names only: nothing outside the LoRA folder is opened (contents: at start)
        try:
            resolve_lora_path(lora.path, manager.config.lora_dir, confine=True)
        except LoraError as exc:
            raise HTTPException(422, f"loras: {exc}") from None
    return settings


def _check_prompts(manager: SessionManager, body: StreamRequest) -> None:
    """422 when a prompt has more tokens than the text encoder reads (with the count and the limit)."""
    pipeline = manager.model.pipeline
    if body.prompts and pipeline is not None:
        problem = prompt_problem(pipeline.components, [p.text for p in body.prompts])
        if problem is not None:
            raise HTTPException(422, problem)


def _vace(
    manager: SessionManager, body: StreamRequest, settings: StreamSettings, requested: dict[str, Any]
) -> tuple[StreamSettings, VaceSetup | None]:
    """A new stream's engine settings and VACE setup (reference images read now): 4xx/503 with the reason."""
    pipeline = manager.model.pipeline
    assert pipeline is not None  # _settings checked
    try:
        return prepare_vace(body.vace, settings, requested, pipeline.components, manager.config.media_dir)
    except VaceRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None


def _reserve(manager: SessionManager, kind: Any) -> Session:
    try:
        return manager.reserve(kind)
    except Busy as exc:
        raise HTTPException(409, str(exc)) from None
    except NotReady as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None


def _http_error(exc: BaseException) -> BaseException:
    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, SignalingError | SecurityError):
        return HTTPException(400, str(exc))
    if isinstance(exc, ValidationError):
        return HTTPException(422, {"error": describe_validation(exc), "details": validation_details(exc)})
    if isinstance(exc, VideoError):
        return HTTPException(415, str(exc))
    if isinstance(exc, SinkUnavailable):
        return HTTPException(422, str(exc))
    if isinstance(exc, ValueError):
        return HTTPException(422, str(exc))
    if isinstance(exc, torch.OutOfMemoryError):
        return HTTPException(
            503, f"not enough GPU memory for this stream (try a smaller resolution or fewer sessions): {exc}"
        )
    if isinstance(exc, Exception):
        return HTTPException(500, f"the stream could not start: {type(exc).__name__}: {exc}")
    return exc  # CancelledError, KeyboardInterrupt: let them through


async def _watch_source(manager: SessionManager, session: Session) -> None:
    """End a headless session when its (non-looping) file is done and its frames have come out."""
    source = session.source
    assert source is not None
    while not (source.finished or source.error):
        await asyncio.sleep(0.25)
    await asyncio.sleep(2.0)  # let the last chunks through
    reason = f"the source ended: {source.error}" if source.error else "the source file ended"
    await manager.close(session.id, reason, "source_ended")


async def _idle_watchdog(manager: SessionManager, session: Session) -> None:
    """End a headless session nobody has asked about for `headless_idle_s` (its script went away)."""
    limit = manager.config.headless_idle_s
    while True:
        idle = time.monotonic() - session.touched
        if idle >= limit:
            await manager.close(session.id, f"no request for this headless session in {limit:g} s", "idle")
            return
        await asyncio.sleep(min(limit - idle + 0.05, 5.0))


def _describe(session: Session, details: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {
        "session_id": session.id,
        "kind": session.kind,
        "state": session.state,
        "source": session.source_label or ("webrtc" if session.kind == "webrtc" else ""),
        "created": session.created,
        "age_s": round(time.time() - session.created, 3),
        "recording": session.recording is not None and session.recording.stopped is None,
    }
    if session.peer is not None:
        info["connection"] = session.peer.connectionState
    if session.worker is not None:
        stats = session.worker.stats()
        info["stats"] = {k: v for k, v in vars(stats).items() if k not in ("settings", "prompts", "vace")}
        info["settings"] = stats.settings
        info["prompts"] = stats.prompts
        info["vace"] = stats.vace
    out = session.output
    if out is not None:
        info["output"] = {
            "sent": out.sent,
            "resent": out.resent,
            "queue": out.depth(),
            "dropped_overflow": out.dropped_overflow,
            "dropped_stale": out.dropped_stale,
            "latency_p50": out.latency.quantile(0.5),
            "latency_p90": out.latency.quantile(0.9),
            "fps": out.send_rate.rate(),
        }
        if details:
            info["output"]["sent_log"] = [list(x) for x in out.sent_log]
    info["rtt"] = session.rtt
    info["sinks"] = [sink.status() for sink in session.sinks.values()]
    if isinstance(session.source, NdiSource):
        info["input"] = session.source.status()
    return info


def _recording_info(session_id: str, recording: Recording) -> RecordingInfo:
    base = f"/api/v1/sessions/{session_id}/recording"
    return RecordingInfo(
        session_id=session_id,
        state="recording" if recording.stopped is None else "stopped",
        output_frames=recording.output.written,
        input_frames=recording.input.written if recording.input is not None else None,
        dropped_frames=recording.output.dropped
        + (recording.input.dropped if recording.input is not None else 0),
        output_url=f"{base}/output.mp4",
        input_url=f"{base}/input.mp4" if recording.input is not None else None,
    )


router.include_router(v1)
