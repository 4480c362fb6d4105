"""The engine worker: one thread per stream that owns the `StreamSession` and never blocks the event loop.

Frame flow (real time beats completeness):

    source (WebRTC track / file) ──put──▶ InputBuffer ──take: uniform sample──▶ session.push ──▶ sinks
                                          bounded; the oldest                   (worker thread)  (output queue,
                                          frame goes when full                                     latest frame,
                                                                                                   recorder)

* `InputBuffer.take(n)` waits for n frames, then samples n of *everything* queued at even spacing and
  drops the rest, so a model slower than the camera stays on the camera's clock instead of falling behind.
* Live updates are queued to the worker and applied between chunks, all-or-nothing: the whole update is
  validated against the session's current settings before anything changes. A reset or a prompt hard
  cut bumps the *epoch*: the output queue is flushed and frames of older epochs are never sent.
* Only this thread touches the session. Other threads read `stats()` and `event_log()` snapshots.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import av
import numpy as np
import torch
from pydantic import ValidationError

from wanstream.engine.measure import percentile
from wanstream.engine.settings import conditioning_problem, text_mode_problem
from wanstream.engine.vace import VaceConditioner
from wanstream.media.video import resize_frames
from wanstream.server.cost import WARMUP_CHUNKS
from wanstream.server.frames import FrameSink, OutputFrame, SourceFrame
from wanstream.server.limits import prompt_problem
from wanstream.server.schemas import Control, ControlAck, describe_validation, validation_details
from wanstream.server.tempo import Quantize, Tempo, lands
from wanstream.server.vace import VaceRefused, VaceSetup, chunk_fields

if TYPE_CHECKING:
    from wanstream.engine.components import Components
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings

log = logging.getLogger("wanstream.server")

WINDOW = 10  # chunks in the rate windows (as Scope: Σframes / Σintervals over the last 10 batches)


class ControlRejected(ValueError):
    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


# ----------------------------------------------------------------------------------------------------
# Input


class InputBuffer:
    """Bounded frame buffer between a source and the worker; never blocks the source."""

    def __init__(self, capacity: int) -> None:
        if capacity < 5:
            raise ValueError(
                f"the input buffer must hold at least one first chunk (5 frames), got {capacity}"
            )
        self._items: deque[tuple[SourceFrame, float]] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._kicked = False
        self.received = 0
        self.overflow = 0  # dropped because the buffer was full (the worker was busy or paused)
        self.sampled_out = 0  # dropped by uniform sampling (the model is slower than the source)
        self.discarded = 0  # dropped on purpose (pause, resume)
        self.rate = RateMeter(60)  # frames per second arriving from the source

    def put(self, frame: SourceFrame, arrived: float) -> None:
        with self._cond:
            if len(self._items) == self._items.maxlen:
                self.overflow += 1
            self._items.append((frame, arrived))
            self.received += 1
            self.rate.add(arrived, 1)
            self._cond.notify()

    def take(self, n: int, timeout: float) -> list[tuple[SourceFrame, float]] | None:
        """n frames sampled evenly from everything queued (which is then consumed), or None on timeout/kick."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._items) < n and not self._kicked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._kicked:
                self._kicked = False
                return None
            queued = len(self._items)
            picked = [self._items[i] for i in uniform_indices(queued, n)]
            self._items.clear()
            self.sampled_out += queued - n
            return picked

    def count_overflow(self) -> None:
        """A frame dropped before it got here (its converter fell behind): counted with the buffer's own."""
        with self._cond:
            self.received += 1
            self.overflow += 1

    def kick(self) -> None:
        """Wake a waiting `take` (a control message is waiting)."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def oldest(self) -> float | None:
        """When the oldest queued frame arrived (None: nothing queued)."""
        with self._cond:
            return self._items[0][1] if self._items else None

    def clear(self) -> None:
        with self._cond:
            self.discarded += len(self._items)
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class FrameConverter:
    """Decoded frames (aiortc / PyAV) to RGB arrays on their own thread, as they arrive.

    Converting a 480x832 frame takes milliseconds; done by the engine thread between chunks it adds to every
    chunk's time in a live stream. Here it overlaps the chunk the engine is computing. The queue is bounded: a
    converter that falls behind drops its oldest frames (counted as input overflow), never the source.
    """

    def __init__(self, out: InputBuffer, capacity: int, name: str) -> None:
        self._out = out
        self._items: deque[tuple[av.VideoFrame, float]] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"wanstream-convert-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, frame: av.VideoFrame, arrived: float) -> None:
        with self._cond:
            if len(self._items) >= self._capacity:
                self._items.popleft()
                self._out.count_overflow()
            self._items.append((frame, arrived))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._items.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                frame, arrived = self._items.popleft()
            try:
                image = frame.to_ndarray(format="rgb24")
            except Exception as exc:  # a frame PyAV cannot convert: skip it, keep the stream
                log.warning("an input frame could not be converted (%s); skipped", exc)
                continue
            self._out.put(image, arrived)


def uniform_indices(available: int, n: int) -> list[int]:
    """n indices spread evenly over [0, available), first and last included (identity when equal)."""
    if n > available:
        raise ValueError(f"cannot sample {n} of {available}")
    if n == 1:
        return [available - 1]
    step = (available - 1) / (n - 1)
    return [round(i * step) for i in range(n)]


def to_rgb(frame: SourceFrame) -> torch.Tensor:
    if isinstance(frame, av.VideoFrame):
        return torch.from_numpy(frame.to_ndarray(format="rgb24"))
    if isinstance(frame, np.ndarray):
        return torch.from_numpy(frame)
    return frame


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The largest centred [h, w] view of `image` with the aspect of height×width (no copy)."""
    h, w = image.shape[0], image.shape[1]
    if h * width > w * height:  # too tall
        ch = max(1, round(w * height / width))
        top = (h - ch) // 2
        return image[top : top + ch]
    cw = max(1, round(h * width / height))
    left = (w - cw) // 2
    return image[:, left : left + cw]


# ----------------------------------------------------------------------------------------------------
# Measurements


class Window:
    """The last `size` values, for rates and percentiles."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(value)

    def quantile(self, q: float) -> float | None:
        """`engine.measure.percentile` of the window (q a fraction), None while it is empty."""
        values = tuple(self.values)  # a snapshot: another thread may be adding
        return percentile(values, q) if values else None


class RateMeter:
    """Frames per second over the last few bursts: Σframes / Σintervals (the first burst has no interval)."""

    def __init__(self, size: int = WINDOW) -> None:
        self._events: deque[tuple[float, int]] = deque(maxlen=size + 1)

    def add(self, when: float, frames: int) -> None:
        self._events.append((when, frames))

    def rate(self) -> float | None:
        events = tuple(self._events)  # a snapshot: another thread may be adding
        if len(events) < 2:
            return None
        span = events[-1][0] - events[0][0]
        frames = sum(n for _, n in events[1:])
        return frames / span if span > 0 else None

    def clear(self) -> None:
        self._events.clear()


@dataclass
class WorkerStats:
    state: str
    mode: str
    paused: bool
    epoch: int
    frames_received: int
    frames_pushed: int
    frames_made: int
    dropped_input_overflow: int
    dropped_sampled: int
    dropped_discarded: int
    input_queue: int
    input_fps: float | None  # frames per second arriving from the source
    output_fps: float | None  # rate frames leave the engine (pacing uses it)
    pipeline_fps: float | None  # frames per second of engine compute time
    chunk_latency_p50: float | None
    chunk_latency_p90: float | None
    engine_latency_p50: float | None  # input arrival → frame out of the engine
    engine_latency_p90: float | None
    # The worker's own time per chunk besides the engine call (seconds, p50): turning the picked input frames
    # into a batch, and handing the output to the sinks. It adds to the chunk time in a live stream.
    prepare_p50: float | None
    emit_p50: float | None
    controls_applied: int
    controls_rejected: int
    chunks: int
    height: int
    width: int
    settings: dict[str, Any]
    prompts: list[tuple[str, float]]
    error: str | None
    vace: dict[str, Any] | None = None  # VACE streams: scale, input routed as control, queued control frames


@dataclass
class _Counters:
    frames_pushed: int = 0
    frames_made: int = 0
    controls_applied: int = 0
    controls_rejected: int = 0
    chunks: int = 0
    compute: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))


# ----------------------------------------------------------------------------------------------------
# The worker


class EngineWorker:
    """Runs one `StreamSession` on its own thread; thread-safe entry points for sources and controls."""

    def __init__(
        self,
        make_session: Callable[[], StreamSession],
        *,
        name: str,
        input_frames: int = 32,
        control_queue: int = 32,
        text_fps: float = 16.0,
        on_fatal: Callable[[str], None] | None = None,
        event_log_size: int = 512,
        vace: VaceSetup | None = None,
        admit: Callable[[StreamSettings], None] | None = None,
        on_chunk: Callable[[StreamSettings, float], None] | None = None,
        tempo: Tempo | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.input = InputBuffer(input_frames)
        self._converter = FrameConverter(self.input, input_frames, name)
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._make_session = make_session
        self._controls: deque[tuple[Control, concurrent.futures.Future[ControlAck]]] = deque()
        self._control_limit = control_queue
        self._control_lock = threading.Lock()
        # Updates quantised to the beat wait here (due time, arrival order) until their chunk comes.
        self._scheduled: list[tuple[float, int, Control, concurrent.futures.Future[ControlAck]]] = []
        self._arrived = 0
        self._tempo = tempo
        self._clock = clock  # the content clock (text-mode pacing, beat scheduling): simulated in tests
        self._sinks: tuple[FrameSink, ...] = ()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._text_fps = text_fps
        self._on_fatal = on_fatal
        self._thread = threading.Thread(target=self._main, name=f"wanstream-engine-{name}", daemon=True)
        self._lock = threading.Lock()  # guards the snapshots below
        self._events: deque[dict[str, Any]] = deque(maxlen=event_log_size)
        self._latest: OutputFrame | None = None
        self._snapshot: dict[str, Any] = {
            "settings": {},
            "prompts": [],
            "mode": "video",
            "height": 0,
            "width": 0,
        }
        self.session: StreamSession | None = None
        self.state = "starting"  # starting → running → stopped | error
        self.error: str | None = None
        self.paused = False
        self.epoch = 0
        self._c = _Counters()
        self._output_rate = RateMeter()
        self._chunk_latency = Window(256)
        self._engine_latency = Window(256)
        self._prepare = Window(64)
        self._emit_time = Window(64)
        self._arrivals: dict[int, float] = {}  # input frame index → arrival time
        self._arrivals_floor = 0
        self._logged_chunk = -1
        self._text_clock = 0.0  # text mode: content time already generated, on the monotonic clock
        self.vace = vace  # VACE streams: how the conditioner is fed (the input may be its control)
        # Raises (ValueError) for settings this device cannot run in real time: a live resolution change
        # is checked before anything is applied, as a new stream is before it starts.
        self._admit = admit
        self._on_chunk = on_chunk  # each measured chunk's settings and time (the device's cost model)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> concurrent.futures.Future[None]:
        self._converter.start()
        self._thread.start()
        return self.ready

    def stop(self) -> None:
        self._converter.stop()
        self._stop.set()
        self._wake.set()
        self.input.kick()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- thread-safe entry points --------------------------------------------------------------------
    def feed(self, frame: SourceFrame, arrived: float | None = None) -> None:
        """A source frame (never blocks; when the buffer is full the oldest frame is dropped)."""
        arrived = time.monotonic() if arrived is None else arrived
        if isinstance(frame, av.VideoFrame):
            self._converter.put(frame, arrived)  # to RGB off this thread and the engine's
        else:
            self.input.put(frame, arrived)

    def control(self, message: Control) -> concurrent.futures.Future[ControlAck]:
        """Queue a live update; the future resolves to the ack or raises ControlRejected."""
        future: concurrent.futures.Future[ControlAck] = concurrent.futures.Future()
        with self._control_lock:
            if self._stop.is_set() or self.state in ("stopped", "error"):
                future.set_exception(ControlRejected("the session has ended"))
                return future
            if len(self._controls) + len(self._scheduled) >= self._control_limit:
                future.set_exception(ControlRejected("too many updates pending; wait for the acks"))
                return future
            self._controls.append((message, future))
        self._wake.set()
        self.input.kick()
        return future

    def add_sink(self, sink: FrameSink) -> None:
        with self._lock:
            self._sinks = (*self._sinks, sink)

    def remove_sink(self, sink: FrameSink) -> None:
        with self._lock:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    def output_rate(self) -> float | None:
        """Frames per second leaving the engine, over the last chunks (what the output is paced at)."""
        return self._output_rate.rate()

    def latest(self) -> OutputFrame | None:
        return self._latest

    def event_log(self, since: int = -1) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._events if e["seq"] > since]

    def stats(self) -> WorkerStats:
        c = self._c
        with self._lock:
            snap = dict(self._snapshot)
            busy = sum(dt for dt, _ in c.compute)
            made = sum(n for _, n in c.compute)
        return WorkerStats(
            state=self.state,
            mode=snap["mode"],
            paused=self.paused,
            epoch=self.epoch,
            frames_received=self.input.received,
            frames_pushed=c.frames_pushed,
            frames_made=c.frames_made,
            dropped_input_overflow=self.input.overflow,
            dropped_sampled=self.input.sampled_out,
            dropped_discarded=self.input.discarded,
            input_queue=len(self.input),
            input_fps=self.input.rate.rate(),
            output_fps=self._output_rate.rate(),
            pipeline_fps=made / busy if busy > 0 and made else None,
            chunk_latency_p50=self._chunk_latency.quantile(0.5),
            chunk_latency_p90=self._chunk_latency.quantile(0.9),
            engine_latency_p50=self._engine_latency.quantile(0.5),
            engine_latency_p90=self._engine_latency.quantile(0.9),
            prepare_p50=self._prepare.quantile(0.5),
            emit_p50=self._emit_time.quantile(0.5),
            controls_applied=c.controls_applied,
            controls_rejected=c.controls_rejected,
            chunks=c.chunks,
            height=snap["height"],
            width=snap["width"],
            settings=snap["settings"],
            prompts=snap["prompts"],
            error=self.error,
            vace=snap.get("vace"),
        )

    # -- the thread ----------------------------------------------------------------------------------
    def _main(self) -> None:
        with torch.inference_mode():  # grad mode is per thread: this one never needs autograd
            self._serve()

    def _serve(self) -> None:
        try:
            self.session = self._make_session()
            self._publish()
        except BaseException as exc:
            self.state = "error"
            self.error = f"the session could not start: {exc}"
            self.ready.set_exception(exc)
            self._fail_pending("the session could not start")
            self._converter.stop()
            return
        self.state = "running"
        self.ready.set_result(None)
        try:
            while not self._stop.is_set():
                self._apply_controls()
                if self._stop.is_set():
                    break
                self._step()
            self.state = "stopped"
        except Exception as exc:
            log.exception("stream %s failed", self.name)
            self.state = "error"
            self.error = f"{type(exc).__name__}: {exc}"
            if self._on_fatal is not None:
                self._on_fatal(self.error)
        finally:
            self._converter.stop()
            self._fail_pending("the session has ended")
            self.session = None  # the session's caches (GPU memory) go with it
            self._arrivals.clear()

    def _step(self) -> None:
        session = self.session
        assert session is not None
        if self.paused:
            self._wake.wait(0.05)
            self._wake.clear()
            return
        if session.settings.mode == "video" or self._input_is_control(session):
            picked = self.input.take(_frames_wanted(session), timeout=0.05)
            if picked is None:
                return
            if session.settings.mode == "video":
                self._run_video_chunk(session, picked)
            else:
                self._run_control_chunk(session, picked)
            return
        # Text mode: generate up to half a second of content ahead of the wall clock, then wait.
        now = self._clock()
        self._text_clock = max(self._text_clock, now)
        ahead = self._text_clock - now
        if ahead > 0.5:
            self._wake.wait(min(ahead - 0.5, 0.05))
            self._wake.clear()
            return
        made = self._run_chunk(session, lambda: session.generate(1), first_input=None, arrivals=())
        self._text_clock += made / self._text_fps

    def _run_video_chunk(self, session: StreamSession, picked: list[tuple[SourceFrame, float]]) -> None:
        s = session.settings
        start = time.perf_counter()
        images = [center_crop(to_rgb(frame), s.height, s.width) for frame, _ in picked]
        if any(im.shape != images[0].shape for im in images):  # the source changed size mid-chunk
            images = [resize_frames(im, s.height, s.width) for im in images]
        # numpy's copy: one memcpy per frame on this thread (torch's wakes its intra-op thread pool)
        batch = torch.from_numpy(np.stack([im.numpy() for im in images]))
        arrivals = [t for _, t in picked]
        self._prepare.add(time.perf_counter() - start)
        self._run_chunk(
            session, lambda: session.push(batch), first_input=session.frames_in, arrivals=arrivals
        )

    def _input_is_control(self, session: StreamSession) -> bool:
        """VACE with the input routed to it (Scope's vace_use_input_video): text mode steered by the input."""
        return self.vace is not None and self.vace.route_input and session.settings.mode == "text"

    def _run_control_chunk(self, session: StreamSession, picked: list[tuple[SourceFrame, float]]) -> None:
        """The input frames as one chunk of VACE control frames; the chunk is generated from noise."""
        cond = _vace_of(session)
        assert cond is not None
        s = session.settings
        batch = torch.stack(
            [resize_frames(center_crop(to_rgb(f), s.height, s.width), s.height, s.width) for f, _ in picked]
        )
        self._run_chunk(session, lambda: cond.push(batch), first_input=None, arrivals=[t for _, t in picked])

    def _run_chunk(
        self,
        session: StreamSession,
        call: Callable[[], torch.Tensor],
        *,
        first_input: int | None,
        arrivals: Sequence[float],
    ) -> int:
        """Run one engine call, hand its frames to the sinks; returns how many frames it made."""
        if first_input is not None:
            for i, t in enumerate(arrivals):
                self._arrivals[first_input + i] = t
        before = session.frames_out
        start = time.perf_counter()
        out = call()
        images = out.cpu().numpy() if out.shape[0] else None  # the one host sync per chunk
        took = time.perf_counter() - start
        count = self._emit(session, images, before)
        self._emit_time.add(time.perf_counter() - start - took)
        with self._lock:
            c = self._c
            c.frames_pushed += len(arrivals)
            c.chunks += 1
            c.compute.append((took, count if first_input is None else len(arrivals)))
        self._chunk_latency.add(took)
        if self._on_chunk is not None and c.chunks > WARMUP_CHUNKS:
            self._on_chunk(session.settings, took)
        self._prune_arrivals(session)
        return count

    def _emit(self, session: StreamSession, images: np.ndarray | None, before: int) -> int:
        """Tag frames the engine just made (output indices from `before`) and hand them to the sinks."""
        if images is None or images.shape[0] == 0:
            return 0
        made_at = time.monotonic()
        frames = self._tag(session, images, before, made_at)
        with self._lock:
            self._c.frames_made += len(frames)
        self._output_rate.add(made_at, len(frames))
        self._latest = frames[-1]
        for sink in self._sinks:
            sink.put(frames)
        return len(frames)

    def _tag(
        self, session: StreamSession, images: np.ndarray, before: int, made_at: float
    ) -> list[OutputFrame]:
        """Attach to each output frame its chunk, prompt and the arrival time of its input frame."""
        n = images.shape[0]
        tags: list[tuple[Any, float | None] | None] = [None] * n
        fresh = []
        for ev in reversed(session.events):
            if ev.output_frames is None:
                continue
            o0, o1 = ev.output_frames
            if o1 <= before:
                break
            for j in range(max(o0, before), min(o1, before + n)):
                source = ev.input_frames[0] + (j - o0) if ev.kind == "input" else None
                tags[j - before] = (ev, None if source is None else self._arrivals.get(source))
            if ev.chunk > self._logged_chunk:
                fresh.append(ev)
        if fresh:
            self._log_chunks(sorted(fresh, key=lambda e: e.chunk))
        frames = []
        for j in range(n):
            tag = tags[j]
            ev, arrived = tag if tag is not None else (None, None)
            if arrived is not None:
                self._engine_latency.add(made_at - arrived)
            frames.append(
                OutputFrame(
                    image=images[j],
                    epoch=self.epoch,
                    chunk=ev.chunk if ev is not None else -1,
                    prompt=ev.prompt if ev is not None else (),
                    source_time=arrived,
                    made=made_at,
                    index=before + j,
                )
            )
        return frames

    def _prune_arrivals(self, session: StreamSession) -> None:
        # Frames whose chunk was discarded by a restart never come out: forget anything far behind.
        floor = session.frames_in - 256
        for i in range(self._arrivals_floor, floor):
            self._arrivals.pop(i, None)
        self._arrivals_floor = max(self._arrivals_floor, floor)

    def _log_chunks(self, events: list[Any]) -> None:
        cond = _vace_of(self.session) if self.session is not None else None
        recent = {c.chunk: c for c in cond.history} if cond is not None else {}
        rows = []
        for ev in events:
            self._logged_chunk = max(self._logged_chunk, ev.chunk)
            rows.append(
                {
                    "type": "chunk",
                    "chunk": ev.chunk,
                    "kind": ev.kind,
                    "epoch": self.epoch,
                    "input_frames": list(ev.input_frames),
                    "output_frames": list(ev.output_frames) if ev.output_frames else None,
                    "prompt": [list(p) for p in ev.prompt],
                    "transition_left": ev.transition_left,
                    "stream_start": ev.stream_start,
                    "position": ev.position,
                    "timesteps": ev.timesteps,
                    "noise_scale": ev.noise_scale,
                    **chunk_fields(cond, ev.chunk, recent),
                    "loras": [list(lo) for lo in ev.loras],
                }
            )
        self._append_events(rows)

    def _append_events(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            seq = self._events[-1]["seq"] if self._events else -1
            for row in rows:
                seq += 1
                self._events.append({"seq": seq, "time": time.time(), **row})

    # -- live control --------------------------------------------------------------------------------
    def _apply_controls(self) -> None:
        while True:
            with self._control_lock:
                if not self._controls:
                    break
                message, future = self._controls.popleft()
            due = self._due(message)
            if due is not None:
                with self._control_lock:
                    self._arrived += 1
                    self._scheduled.append((due, self._arrived, message, future))
                    self._scheduled.sort(key=lambda item: item[:2])
                continue
            self._settle(message, future)
        start, length = self._next_chunk()
        while True:
            with self._control_lock:
                if not self._scheduled or not lands(start, length, self._scheduled[0][0]):
                    return
                due, _, message, future = self._scheduled.pop(0)
            self._settle(message, future, timing={"due": due, "chunk_start": start})

    def _settle(
        self,
        message: Control,
        future: concurrent.futures.Future[ControlAck],
        timing: dict[str, float] | None = None,
    ) -> None:
        try:
            ack = self._apply(message, timing)
        except ControlRejected as exc:
            with self._lock:
                self._c.controls_rejected += 1
            future.set_exception(exc)
            return
        with self._lock:
            self._c.controls_applied += 1
        future.set_result(ack)

    # -- beat quantisation ---------------------------------------------------------------------------
    def _due(self, message: Control) -> float | None:
        """When a quantised update is due (monotonic seconds): the first beat / downbeat that the stream
        can still land it on, i.e. one no earlier than half a chunk before the next chunk's start."""
        quantize = quantize_of(message, self._tempo)
        if quantize == "off" or self._tempo is None:
            return None
        start, length = self._next_chunk()
        return self._tempo.due(quantize, after=start - length / 2)

    def _next_chunk(self) -> tuple[float, float]:
        """The content time (monotonic seconds) the next chunk starts at, and a chunk's length in seconds:
        text mode runs on its own clock; input video on its frames' arrival (the oldest one queued)."""
        session = self.session
        now = self._clock()
        frames = session.chunk_frames if session is not None else 4
        if session is None or (session.settings.mode == "text" and not self._input_is_control(session)):
            return max(self._text_clock, now), frames / self._text_fps
        oldest = self.input.oldest()
        fps = self.input.rate.rate() or self._text_fps
        return (oldest if oldest is not None else now), frames / fps

    def _apply(self, message: Control, timing: dict[str, float] | None = None) -> ControlAck:
        """Apply one update all-or-nothing; `timing` (quantised updates): the beat it was due on and the
        content time of the chunk it lands on (monotonic seconds), kept in the event log."""
        session = self.session
        assert session is not None
        update = message.settings_update()
        prompts = message.prompts
        # Validate everything first: nothing is applied unless all of it can be.
        new_settings = session.settings
        if update is not None:
            try:
                new_settings = session.settings.updated(update)
            except ValidationError as exc:
                raise ControlRejected(describe_validation(exc), validation_details(exc)) from None
        # Checked here because the engine rebuilds before it finds a missing autoencoder.
        problem = missing_codec(session.components, new_settings)
        if problem is not None:
            raise ControlRejected(problem)
        if self._admit is not None and update is not None:
            try:
                self._admit(new_settings)
            except ValueError as exc:
                raise ControlRejected(str(exc)) from None
        if prompts is not None and session.components.text_encoder is None:
            raise ControlRejected("this model has no text encoder loaded, so prompts cannot change")
        if prompts is not None:
            problem = prompt_problem(session.components, [p.text for p in prompts])
            if problem is not None:
                raise ControlRejected(problem)
        has_prompts = prompts is not None or session.prompt.embedding is not None
        if problem := text_mode_problem(new_settings.mode, has_prompts):
            raise ControlRejected(f"{problem}: send 'prompts' with the mode change")
        vace_change = self._vace_change(session, message, new_settings)
        before = session.frames_out
        drained = None
        try:
            if vace_change is not None:
                vace_change()  # first: its one possible refusal (an extension frame pending) changes nothing
            if update is not None:
                # A restarting settings change lets chunks still in flight out first (old settings).
                drained = session.update(update)
            if prompts is not None:
                session.set_prompts(prompts, transition=message.transition, switch=message.switch)
            if message.reset:
                session.reset()
        except (ValidationError, ValueError, RuntimeError) as exc:
            # The engine validates too; whatever it rejects leaves the session as it was.
            raise ControlRejected(str(exc)) from None
        applied = sorted(k for k in message.model_fields_set if k not in ("id", "quantize"))
        if message.paused is not None and message.paused != self.paused:
            self.paused = message.paused
            if session.journal is not None:  # nothing changes in the engine; the take's story says where
                session.journal.mark("pause" if message.paused else "resume")
            self.input.clear()  # frames that waited out a pause are stale
            self._text_clock = 0.0
            self._output_rate.clear()
        restarted = _at_stream_start(session)
        # A reset or a prompt change that restarted the stream is a cut: nothing made before it may be
        # shown after it. A settings restart only changes how the stream continues: its drained frames go out.
        flushed = message.reset or (prompts is not None and restarted)
        if flushed:
            self.epoch += 1
            self._latest = None
            for sink in self._sinks:
                sink.flush(self.epoch)
            self._output_rate.clear()
        elif drained is not None and drained.shape[0]:
            self._emit(session, drained.cpu().numpy(), before)
        next_chunk = session.events[-1].chunk + 1 if session.events else 0
        self._publish()
        self._append_events(
            [
                {
                    "type": "control",
                    "id": message.id,
                    "applied": applied,
                    "prompt": [list(p) for p in session.prompt.describe()],
                    "restarted": restarted,
                    "flushed": flushed,
                    "epoch": self.epoch,
                    "next_chunk": next_chunk,
                    **(timing or {}),
                }
            ]
        )
        return ControlAck(
            id=message.id,
            applied=applied,
            restarted=restarted,
            flushed=flushed,
            epoch=self.epoch,
            next_chunk=next_chunk,
        )

    def _vace_change(
        self, session: StreamSession, message: Control, new_settings: StreamSettings
    ) -> Callable[[], None] | None:
        """Validate a message's VACE fields (images read now); returns how to apply them, or None."""
        cond = _vace_of(session)
        if cond is not None and (problem := conditioning_problem(new_settings.batching)):
            raise ControlRejected(problem)
        fields = message.vace_fields()
        if not fields:
            return None
        if cond is None or self.vace is None:
            raise ControlRejected(
                f'{", ".join(sorted(fields))}: this stream runs without VACE (start it with "vace": {{}})'
            )
        setup = self.vace
        try:
            refs = None
            if message.vace_ref_images is not None:
                refs = [setup.read_image(n, "vace_ref_images") for n in message.vace_ref_images]
            first = message.first_frame_image
            last = message.last_frame_image
            first_image = setup.read_image(first, "first_frame_image") if first is not None else None
            last_image = setup.read_image(last, "last_frame_image") if last is not None else None
        except VaceRefused as exc:
            raise ControlRejected(str(exc)) from None

        def apply() -> None:
            if first_image is not None:
                cond.set_first_frame(first_image)
            if last_image is not None:
                cond.set_last_frame(last_image)
            if message.vace_context_scale is not None:
                cond.set_scale(message.vace_context_scale)
            if refs is not None:
                cond.set_reference_images(refs or None, persist=setup.persist_refs)

        return apply

    def _publish(self) -> None:
        session = self.session
        assert session is not None
        s = session.settings
        cond = _vace_of(session)
        snapshot = {
            "settings": s.model_dump(mode="json"),
            "prompts": [list(p) for p in session.prompt.describe()],
            "mode": s.mode,
            "height": s.height,
            "width": s.width,
            "vace": self.vace.describe(cond) if self.vace is not None else None,
        }
        with self._lock:
            self._snapshot = snapshot

    def _fail_pending(self, reason: str) -> None:
        with self._control_lock:
            pending, self._controls = list(self._controls), deque()
            pending += [(message, future) for _, _, message, future in self._scheduled]
            self._scheduled = []
        for _, future in pending:
            if not future.done():
                future.set_exception(ControlRejected(reason))


def quantize_of(message: Control, tempo: Tempo | None) -> Quantize:
    """Where an update lands: its own `quantize`, else the tempo's default for prompt changes and resets
    (settings alone, such as a noise scale an audio level drives, apply at once unless they ask)."""
    if message.quantize is not None:
        return message.quantize
    if tempo is not None and (message.prompts is not None or message.reset):
        return tempo.quantize
    return "off"


def missing_codec(components: Components, settings: StreamSettings) -> str | None:
    """Why `settings` cannot run on these components (an autoencoder that is not loaded), or None."""
    loaded = {"wan": components.wan_vae is not None, "taehv": components.taehv is not None}
    roles = [("decoder", settings.decoder)] + (
        [("encoder", settings.encoder)] if settings.mode == "video" else []
    )
    for role, codec in roles:
        if not loaded[codec]:
            other = "taehv" if codec == "wan" else "wan"
            hint = f"; use {role} '{other}'" if loaded[other] else ""
            return f"the {role} '{codec}' is not loaded on this server{hint}"
    return None


# The worker feeds exactly one chunk at a time (no standing input lag) and must know when a control
# restarted the stream (so stale frames are flushed).
def _frames_wanted(session: StreamSession) -> int:
    """Input frames that complete the session's next chunk (5 at a stream start, else 4)."""
    return max(1, session.frames_needed)


def _vace_of(session: StreamSession) -> VaceConditioner | None:
    cond = session.conditioner
    return cond if isinstance(cond, VaceConditioner) else None


def _at_stream_start(session: StreamSession) -> bool:
    return session.at_stream_start
