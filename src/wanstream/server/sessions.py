"""Stream sessions: capacity (one GPU session by default), start-up, and complete teardown.

A session is one engine worker plus what feeds and drains it: a WebRTC peer (client track in,
generated track out, `parameters` data channel) or a headless source (a server-side file, or nothing in
text mode). Every way a session ends — the client leaves, ICE fails or never completes, a fatal engine
error, DELETE, server shutdown — goes through `SessionManager.close`, which stops the source, the worker
thread, the tracks, the peer and any recording, waits for them, and only then frees the slot (so the GPU
memory of one session is gone before the next one starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from wanstream.engine.estimate import Row
from wanstream.engine.lora import configure_loras
from wanstream.engine.prompts import DEFAULT_PROMPT, WeightedPrompt
from wanstream.engine.settings import SettingsUpdate, StreamSettings
from wanstream.server.config import ServerConfig
from wanstream.server.cost import ChunkCost
from wanstream.server.frames import SourceFrame
from wanstream.server.io.ndi import NdiSource
from wanstream.server.io.sinks import QueuedSink, SinkUnavailable
from wanstream.server.io.specs import MAX_SINKS, SinkSpec
from wanstream.server.model import ModelManager
from wanstream.server.recording import Recorder
from wanstream.server.sources import FileSource
from wanstream.server.takes import Take
from wanstream.server.tempo import Tempo
from wanstream.server.tracks import PacedOutputTrack
from wanstream.server.vace import VaceSetup
from wanstream.server.worker import EngineWorker, WorkerStats
from wanstream.weights.lora import LoraFiles

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection

    from wanstream.engine.session import StreamSession
    from wanstream.server.playback import TimelinePlayer

log = logging.getLogger("wanstream.server")

# The demo model's default stream: small and with the tiny autoencoder, so it runs in real time on a CPU
# (its Wan VAE at 480×832 would make about one frame every two seconds there).
DEMO_SETTINGS = StreamSettings(height=256, width=256, encoder="taehv", decoder="taehv")
SessionKind = Literal["webrtc", "headless"]
SHUTDOWN_WAIT_S = 10.0  # at shutdown, an engine thread still in a chunk after this is left to the exit
# How a session ended (a label of wanstream_sessions_ended_total).
Outcome = Literal[
    "client", "deleted", "ice_timeout", "ice_failed", "idle", "source_ended", "error", "shutdown"
]


class SinkExists(ValueError):
    """The session already has a sink with this id (adding it again changes nothing)."""


class Busy(RuntimeError):
    """All session slots are taken (HTTP 409)."""


class NotReady(RuntimeError):
    """The model is not loaded (HTTP 503)."""


class SessionNotFound(KeyError):
    pass


@dataclass
class Recording:
    output: Recorder
    input: Recorder | None
    started: float = field(default_factory=time.time)
    stopped: float | None = None
    output_path: Path | None = None
    input_path: Path | None = None


@dataclass
class Session:
    id: str
    kind: SessionKind
    created: float = field(default_factory=time.time)
    state: Literal["starting", "running", "closing", "closed"] = "starting"
    close_reason: str | None = None
    worker: EngineWorker | None = None
    peer: RTCPeerConnection | None = None
    channel: RTCDataChannel | None = None
    output: PacedOutputTrack | None = None
    source: FileSource | NdiSource | None = None
    source_label: str = ""
    sinks: dict[str, QueuedSink] = field(default_factory=dict)  # server-side outputs by id (io/attach.py)
    vace: VaceSetup | None = None  # set before the worker starts: VACE attached, input routed as control
    recording: Recording | None = None
    take: Take | None = None  # the stream's session log (docs/replay.md)
    player: TimelinePlayer | None = None  # a timeline the server plays to this stream (REST / OSC)
    remote_candidates: int = 0  # trickled ICE candidates accepted (limited per session)
    rtt: float | None = None  # network round trip from RTCP reports (seconds)
    touched: float = field(default_factory=time.monotonic)  # last API request about it (headless idle)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def feed(self, frame: SourceFrame, arrived: float) -> None:
        """A source frame in (any thread): to the worker, and to the input recording if one runs."""
        if self.worker is not None:
            self.worker.feed(frame, arrived)
        recording = self.recording
        if recording is not None and recording.input is not None and recording.stopped is None:
            recording.input.put_frame(frame, arrived)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"wanstream-{name}-{self.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


@dataclass
class Totals:
    """Counters of sessions that have ended (live sessions add theirs on top)."""

    sessions: Counter[str] = field(default_factory=Counter)  # by how they ended
    rejected_busy: int = 0
    frames_received: int = 0
    frames_made: int = 0
    frames_sent: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    sink_written: Counter[str] = field(default_factory=Counter)  # by sink id (e.g. "ndi:wanstream")
    sink_dropped: Counter[str] = field(default_factory=Counter)


# Ended streams' logs kept for download: their frames are on disk (up to --take-log-mib each), so few.
KEPT_TAKES = 4


class SessionManager:
    def __init__(self, config: ServerConfig, model: ModelManager, recordings_dir: Path) -> None:
        self.config = config
        self._lora_files = LoraFiles(config.lora_dir, confine=True)  # clients name LoRAs: only this folder
        self.model = model
        self.recordings_dir = recordings_dir
        self.sessions: dict[str, Session] = {}
        self.totals = Totals()
        self.finished_recordings: dict[str, Recording] = {}  # kept for download after the session ends
        self.takes_dir = recordings_dir / "takes"
        self.finished_takes: dict[str, Take] = {}  # session logs kept for download after the session ends
        self.cost = ChunkCost(config.max_chunk_s)  # what a chunk costs here: over-long streams are refused
        self.tempo = Tempo()  # one musical clock for the server: quantised updates land on its beats
        self.estimate_rows: list[Row] = []  # measured rows: a stream that would not fit the GPU is refused
        # Slots held by device work that is not a stream (a take's replay, replays.py), by holder id: added
        # on the event loop, discarded from the worker's thread when its work has stopped.
        self.held_slots: set[str] = set()

    @property
    def lora_files(self) -> LoraFiles:
        """The LoRA files clients may name (only the server's LoRA folder)."""
        return self._lora_files

    # -- capacity ------------------------------------------------------------------------------------
    def reserve(self, kind: SessionKind) -> Session:
        """Take a slot now (no await between the check and the insert, so two offers cannot both win)."""
        self._check_capacity()
        session = Session(id=secrets.token_urlsafe(9), kind=kind)
        self.sessions[session.id] = session
        return session

    def hold_slot(self, holder: str) -> None:
        """Take a stream slot for other work on the device (a replay: it runs a session like a stream);
        Busy / NotReady as for a stream. `release_slot` gives it back (from any thread)."""
        self._check_capacity()
        self.held_slots.add(holder)

    def release_slot(self, holder: str) -> None:
        self.held_slots.discard(holder)

    def _check_capacity(self) -> None:
        if len(self.sessions) + len(self.held_slots) >= self.config.max_sessions:
            self.totals.rejected_busy += 1
            n = self.config.max_sessions
            replays = len(self.held_slots)
            also = (
                f" ({replays} of them {'a take' if replays == 1 else 'takes'} replaying)" if replays else ""
            )
            raise Busy(
                f"the server is busy: {n} stream{'s' if n > 1 else ''} already running{also} "
                f"(--max-sessions {n}); try again when it ends"
            )
        if self.model.pipeline is None:
            raise NotReady(self.model.not_ready_reason())

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    # -- start-up ------------------------------------------------------------------------------------
    def resolve_settings(self, update: SettingsUpdate | None) -> StreamSettings:
        """Server defaults (the pipeline's, then the command line's) with the request's overrides."""
        pipeline = self.model.pipeline
        base = default_settings(self.config, demo=pipeline is not None and pipeline.is_demo)
        return base.updated(update) if update is not None else base

    async def start_worker(
        self, session: Session, settings: StreamSettings, prompts: list[WeightedPrompt] | None
    ) -> EngineWorker:
        """Build the engine session on its own thread and wait (without blocking the loop) until it runs."""
        pipeline = self.model.pipeline
        assert pipeline is not None
        if prompts is None:
            prompts = [WeightedPrompt(text=DEFAULT_PROMPT)]
        loop = asyncio.get_running_loop()

        def fatal(reason: str) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(
                    lambda: session.spawn(self.close(session.id, f"engine error: {reason}", "error"), "close")
                )

        vace = session.vace

        take = None
        if self.config.take_log_mib > 0 and pipeline.ring is None:
            take = Take.open(session.id, self.takes_dir / session.id, settings, self.config.take_log_mib)
        session.take = take

        def make_session() -> StreamSession:
            # On the engine thread: the LoRA manager's lock is held by other streams for whole chunks, so
            # the event loop never takes it. Clients name LoRAs: only the server's LoRA folder is opened.
            configure_loras(pipeline.components, self._lora_files)
            engine = pipeline.session(settings, prompts=prompts, log=take.journal if take else False)
            if vace is not None:
                vace.attach(engine)
            return engine

        worker = EngineWorker(
            make_session,
            name=session.id,
            vace=vace,
            input_frames=self.config.input_queue_frames,
            control_queue=self.config.control_queue,
            text_fps=self.config.text_fps,
            on_fatal=fatal,
            admit=self.cost.check,
            on_chunk=self.cost.observe,
            tempo=self.tempo,
        )
        session.worker = worker
        if take is not None:
            worker.add_sink(take.digests)
        await asyncio.wrap_future(worker.start())
        session.state = "running"
        return worker

    # -- teardown ------------------------------------------------------------------------------------
    async def close(self, session_id: str, reason: str, outcome: Outcome) -> None:
        session = self.sessions.get(session_id)
        if session is None or session.state in ("closing", "closed"):
            if session is not None:
                await session.closed.wait()
            return
        session.state = "closing"
        session.close_reason = reason
        log.info("closing session %s: %s", session_id, reason)
        try:
            await self._teardown(session, engine_wait=SHUTDOWN_WAIT_S if outcome == "shutdown" else None)
        finally:
            self._account(session, outcome)
            self.sessions.pop(session_id, None)
            session.state = "closed"
            session.closed.set()
            release_memory()

    async def _teardown(self, session: Session, engine_wait: float | None) -> None:
        current = asyncio.current_task()
        tasks = [t for t in session.tasks if t is not current]
        for task in tasks:
            task.cancel()
        if session.source is not None:
            session.source.stop()
        if session.worker is not None:
            session.worker.stop()
        if session.channel is not None and session.channel.readyState == "open":
            with contextlib.suppress(Exception):
                session.channel.send(json.dumps({"type": "stream_stopped", "reason": session.close_reason}))
        if session.output is not None:
            session.output.stop()
        if session.peer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.peer.close(), 10)
        await asyncio.gather(*tasks, return_exceptions=True)
        if session.source is not None:
            await asyncio.to_thread(session.source.join, 10)
        if session.worker is not None:
            await _join_engine(session, engine_wait)
        for sink_id in list(session.sinks):
            await self.remove_sink(session, sink_id)
        if session.recording is not None:
            await self.stop_recording(session)
        if session.take is not None:
            await asyncio.to_thread(session.take.finish)
            self._keep_take(session.take)
        session.channel = None
        session.peer = None

    def _account(self, session: Session, outcome: Outcome) -> None:
        t = self.totals
        t.sessions[outcome] += 1
        if session.worker is not None:
            s = session.worker.stats()
            t.frames_received += s.frames_received
            t.frames_made += s.frames_made
            t.dropped.update(dropped_counts(s, session.output))
        if session.output is not None:
            t.frames_sent += session.output.sent

    async def add_sink(self, session: Session, spec: SinkSpec) -> QueuedSink:
        """Open a sink at the stream's size (off the loop) and attach it. ValueError: a duplicate, too many,
        or the session is not running; SinkUnavailable: it cannot run here (the message says why)."""
        worker = session.worker
        if worker is None or session.state != "running":
            raise ValueError("the session is not running")
        if spec.id in session.sinks:
            raise SinkExists(f"the session already has the sink {spec.id!r}")
        if len(session.sinks) >= MAX_SINKS:
            raise ValueError(f"a session has at most {MAX_SINKS} sinks")
        sink = spec.make()
        session.sinks[spec.id] = sink  # held before the await: a second request for it is refused
        stats = worker.stats()
        try:
            await asyncio.to_thread(
                sink.open, stats.height, stats.width, worker.output_rate() or self.config.text_fps
            )
        except BaseException:
            session.sinks.pop(spec.id, None)
            await asyncio.to_thread(sink.close)
            raise
        if session.state != "running":  # the session ended while the device opened
            session.sinks.pop(spec.id, None)
            await asyncio.to_thread(sink.close)
            raise SinkUnavailable("the session ended")
        sink.start(worker.epoch, worker.output_rate)
        worker.add_sink(sink)
        return sink

    async def remove_sink(self, session: Session, sink_id: str) -> QueuedSink:
        """Detach a sink, stop its thread, release its device and count what it did (KeyError: none)."""
        sink = session.sinks.pop(sink_id)
        if session.worker is not None:
            session.worker.remove_sink(sink)
        await asyncio.to_thread(sink.close)
        self.totals.sink_written[sink.id] += sink.written
        self.totals.sink_dropped[sink.id] += sink.dropped
        return sink

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(self.close(sid, reason, "shutdown") for sid in list(self.sessions)))

    # -- recording -----------------------------------------------------------------------------------
    def start_recording(self, session: Session, include_input: bool) -> Recording:
        if session.recording is not None and session.recording.stopped is None:
            raise ValueError("this session is already recording; stop it first")
        if session.worker is None:
            raise ValueError("the session has not started yet")
        self.recordings_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{session.id}-{time.strftime('%Y%m%d-%H%M%S')}"
        output = Recorder(self.recordings_dir / f"{stem}-output.mp4", name=f"{session.id}-out")
        source = None
        if include_input:
            source = Recorder(self.recordings_dir / f"{stem}-input.mp4", name=f"{session.id}-in")
        recording = Recording(output=output, input=source)
        session.recording = recording
        session.worker.add_sink(output)
        return recording

    async def stop_recording(self, session: Session) -> Recording:
        recording = session.recording
        if recording is None:
            raise ValueError("this session is not recording")
        if recording.stopped is None:
            recording.stopped = time.time()
            if session.worker is not None:
                session.worker.remove_sink(recording.output)
            recording.output_path = await asyncio.to_thread(recording.output.close)
            if recording.input is not None:
                recording.input_path = await asyncio.to_thread(recording.input.close)
            self._keep_recording(session.id, recording)
        return recording

    def recording_for(self, session_id: str) -> Recording | None:
        session = self.sessions.get(session_id)
        if session is not None and session.recording is not None:
            return session.recording
        return self.finished_recordings.get(session_id)

    def take_for(self, session_id: str) -> Take | None:
        session = self.sessions.get(session_id)
        if session is not None and session.take is not None:
            return session.take
        return self.finished_takes.get(session_id)

    def _keep_take(self, take: Take, keep: int = KEPT_TAKES) -> None:
        self.finished_takes[take.session_id] = take
        while len(self.finished_takes) > keep:
            oldest = next(iter(self.finished_takes))
            self.finished_takes.pop(oldest).remove()

    def _keep_recording(self, session_id: str, recording: Recording, keep: int = 16) -> None:
        self.finished_recordings[session_id] = recording
        while len(self.finished_recordings) > keep:
            oldest = next(iter(self.finished_recordings))
            old = self.finished_recordings.pop(oldest)
            for path in (old.output_path, old.input_path):
                if path is not None:
                    path.unlink(missing_ok=True)


def default_settings(config: ServerConfig, *, demo: bool) -> StreamSettings:
    """A new stream's settings before its request's: the pipeline's defaults, then the command line's."""
    base = DEMO_SETTINGS if demo else StreamSettings()
    if config.settings_overrides:
        base = base.updated(SettingsUpdate.model_validate(config.settings_overrides))
    return base


async def _join_engine(session: Session, limit: float | None) -> None:
    """Wait for the engine thread to end (it stops at the next chunk boundary, and chunk times are bounded
    by `ChunkCost`). The slot is held until then, so a stream still computing always counts against
    --max-sessions. Only at shutdown is the wait bounded (the process exits with it)."""
    worker = session.worker
    assert worker is not None
    waited = 0.0
    while not await asyncio.to_thread(worker.join, 10.0):
        waited += 10.0
        if limit is not None and waited >= limit:
            log.error("session %s: the engine thread did not stop within %g s", session.id, waited)
            return
        log.warning(
            "session %s: still waiting for the engine thread to end its chunk (%g s)", session.id, waited
        )


def dropped_counts(stats: WorkerStats, output: PacedOutputTrack | None) -> dict[str, int]:
    counts = {
        "sampled": stats.dropped_sampled,
        "input_overflow": stats.dropped_input_overflow,
        "discarded": stats.dropped_discarded,
    }
    if output is not None:
        counts["stale"] = output.dropped_stale
        counts["output_overflow"] = output.dropped_overflow
    return counts


def release_memory() -> None:
    """Hand a finished session's memory back: CUDA's cache, and glibc's free heap pages (the codec
    and frame buffers of a stream are freed by many threads, and glibc keeps such pages otherwise, so a
    server that runs for days would creep up by about a megabyte per session)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()
