"""aiortc tracks: the client's video into the worker, the generated video back out, paced.

The output track is also the worker's frame sink. Frames arrive in bursts (a chunk at a time); `recv`
sends each at its input frame's arrival plus the stream's playout delay, so the output keeps the camera's
cadence at a steady latency (pacing.py; frames made from no input are spread at the engine's rate). The queue is bounded (the
oldest frame goes first) and a restart (reset / prompt cut) empties it: a frame from an older epoch is
never returned, even one popped just before the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from fractions import Fraction

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from wanstream.server.frames import OutputFrame, SourceFrame
from wanstream.server.pacing import Playout
from wanstream.server.worker import EngineWorker, RateMeter, Window

VIDEO_CLOCK = 90_000  # RTP video clock (Hz)
TIME_BASE = Fraction(1, VIDEO_CLOCK)
KEEPALIVE_S = 1.0  # with nothing new (paused, waiting) the last frame is re-sent this often


class PacedOutputTrack(MediaStreamTrack):
    """The generated video (a `MediaStreamTrack` for aiortc and a `FrameSink` for the worker)."""

    kind = "video"

    def __init__(self, worker: EngineWorker, loop: asyncio.AbstractEventLoop, capacity: int = 12) -> None:
        super().__init__()
        self._worker = worker
        self._loop = loop
        self._frames: deque[OutputFrame] = deque()
        self._capacity = capacity
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()
        self._epoch = worker.epoch
        self._next_send: float | None = None
        self._playout = Playout()
        self._start: float | None = None
        self._last_pts = -1
        self._last: av.VideoFrame | None = None
        self.sent = 0
        self.resent = 0
        self.dropped_overflow = 0
        self.dropped_stale = 0
        self.latency = Window(256)  # input arrival → handed to the encoder (seconds)
        self.send_rate = RateMeter(30)
        self.sent_log: deque[tuple[int, int, str]] = deque(maxlen=512)  # (epoch, chunk, first prompt)

    # -- FrameSink (worker thread) -------------------------------------------------------------------
    def put(self, frames: Sequence[OutputFrame]) -> None:
        self._playout.observe(frames)
        with self._lock:
            for frame in frames:
                if frame.epoch != self._epoch:
                    self.dropped_stale += 1
                    continue
                if len(self._frames) >= self._capacity:
                    self._frames.popleft()
                    self.dropped_overflow += 1
                self._frames.append(frame)
        self._notify()

    def flush(self, epoch: int) -> None:
        with self._lock:
            self._epoch = epoch
            self.dropped_stale += len(self._frames)
            self._frames.clear()
            self._next_send = None

    def depth(self) -> int:
        return len(self._frames)

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._arrived.set)

    # -- MediaStreamTrack (event loop) ---------------------------------------------------------------
    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            item = await self._next_frame()
            if item is None:  # nothing new for a while: repeat the last frame to keep the stream alive
                if self._last is not None:
                    self.resent += 1
                    return self._stamp(self._last)
                continue
            await self._pace(item)
            with self._lock:
                stale = item.epoch != self._epoch
            if stale:  # a restart happened while this frame waited for its slot
                self.dropped_stale += 1
                continue
            frame = av.VideoFrame.from_ndarray(item.image, format="rgb24")
            self._last = frame
            now = time.monotonic()
            if item.source_time is not None:
                self.latency.add(now - item.source_time)
            self.sent += 1
            self.send_rate.add(now, 1)
            self.sent_log.append((item.epoch, item.chunk, item.prompt[0][0] if item.prompt else ""))
            return self._stamp(frame)

    async def _next_frame(self) -> OutputFrame | None:
        deadline = self._loop.time() + KEEPALIVE_S
        while True:
            with self._lock:
                if self._frames:
                    return self._frames.popleft()
                self._arrived.clear()
            left = deadline - self._loop.time()
            if left <= 0 or self.readyState != "live":
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def _pace(self, frame: OutputFrame) -> None:
        """Wait for this frame's slot (pacing.py): its input's arrival + the playout delay."""
        now = self._loop.time()
        self._next_send = self._playout.slot(
            frame, self._next_send, now, self._worker.output_rate(), self.depth()
        )
        wait = self._next_send - now
        if wait > 0:
            await asyncio.sleep(wait)

    def _stamp(self, frame: av.VideoFrame) -> av.VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        pts = max(int((now - self._start) * VIDEO_CLOCK), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = TIME_BASE
        return frame


async def pump_input(track: MediaStreamTrack, feed: Callable[[SourceFrame, float], None]) -> None:
    """Move the client's frames into the worker until the track ends (decoding happens in aiortc)."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        feed(frame, time.monotonic())
