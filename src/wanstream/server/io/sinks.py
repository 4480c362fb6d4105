"""Server-side sinks: where a session's generated frames go besides the browser.

Every sink is a `FrameSink` for the worker with its own bounded queue and its own thread:

    worker ──put (never blocks)──▶ queue (bounded: the oldest frame goes) ──pace──▶ write (sink thread)

A sink that cannot keep up (a slow encoder, a stalled receiver, a busy virtual camera) drops its own
oldest frames and counts them (`dropped`, `wanstream_sink_dropped_frames_total` in /metrics); the
stream and the other sinks never wait for it. Frames leave the queue at their input's cadence and one
steady delay (chunks arrive in bursts), as the WebRTC track paces them, so a display downstream sees
steady motion (pacing.py). A restart (reset / prompt cut) flushes the queue: older frames are never written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from wanstream.server.pacing import Playout

if TYPE_CHECKING:
    from wanstream.server.frames import OutputFrame


log = logging.getLogger("wanstream.server")


class SinkUnavailable(RuntimeError):
    """This sink cannot run here (a missing package, device or OS); the message says what to do."""


class QueuedSink:
    """A frame sink with its own bounded queue and writer thread. Subclasses implement `open`
    (blocking, before frames flow: fails with `SinkUnavailable`), `write` and `release`."""

    kind = "sink"

    def __init__(
        self, name: str | None = None, *, capacity: int = 48
    ) -> None:  # ≥ the playout delay's frames
        if capacity < 1:
            raise ValueError(f"a sink queue holds at least one frame, got {capacity}")
        self.name = name
        self.id = f"{self.kind}:{name}" if name else self.kind
        self._frames: deque[OutputFrame] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._epoch = 0
        self._stop = threading.Event()
        self._rate: Callable[[], float | None] = lambda: None
        self._thread: threading.Thread | None = None
        self._next: float | None = None
        self._playout = Playout()
        self.state = "starting"  # starting → running → stopped | error
        self.error: str | None = None
        self.written = 0
        self.dropped = 0  # the sink was slower than the stream: its oldest queued frames went
        self.stale = 0  # flushed by a restart (reset / prompt cut)
        self.last_write_s: float | None = None

    # -- lifecycle (event loop / manager) ------------------------------------------------------------
    def open(self, height: int, width: int, fps: float) -> None:
        """Acquire the device / sender for a stream of this size (blocking; run it off the event loop)."""

    def start(self, epoch: int, rate: Callable[[], float | None]) -> None:
        """Start writing; `rate` is the engine's output rate (frames per second) to pace at."""
        self._epoch = epoch
        self._rate = rate
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name=f"wanstream-sink-{self.id}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and release the device (blocking: call it off the event loop)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.release()
        except Exception as exc:  # releasing must not stop the rest of a teardown
            log.warning("sink %s: release failed: %s", self.id, exc)
        if self.state != "error":
            self.state = "stopped"

    # -- FrameSink (worker thread) -------------------------------------------------------------------
    def put(self, frames: Sequence[OutputFrame]) -> None:
        self._playout.observe(frames)
        with self._cond:
            for frame in frames:
                if frame.epoch > self._epoch:  # a restart this sink was added too late to hear of
                    self.stale += len(self._frames)
                    self._frames.clear()
                    self._epoch = frame.epoch
                if frame.epoch != self._epoch:
                    self.stale += 1
                    continue
                if self.state == "error":
                    self.dropped += 1
                    continue
                if len(self._frames) >= self._capacity:
                    self._frames.popleft()
                    self.dropped += 1
                self._frames.append(frame)
            self._cond.notify()

    def flush(self, epoch: int) -> None:
        with self._cond:
            self._epoch = epoch
            self.stale += len(self._frames)
            self._frames.clear()
            self._next = None

    def depth(self) -> int:
        return len(self._frames)

    # -- subclass interface (sink thread) ------------------------------------------------------------
    def write(self, frame: OutputFrame) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Give the device / sender back (called once, after the thread has stopped)."""

    def describe(self) -> dict[str, Any]:
        """Kind-specific status fields (e.g. an address to connect to)."""
        return {}

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "state": self.state,
            "error": self.error,
            "written": self.written,
            "dropped": self.dropped,
            "stale": self.stale,
            "queue": self.depth(),
            "capacity": self._capacity,
            **self.describe(),
        }

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self._take()
            if frame is None:
                continue
            if not self._pace(frame):
                return
            with self._cond:
                stale = frame.epoch != self._epoch
            if stale:  # a restart happened while it waited for its slot
                self.stale += 1
                continue
            start = time.perf_counter()
            try:
                self.write(frame)
            except Exception as exc:
                self._fail(
                    f"{type(exc).__name__}: {exc}" if not isinstance(exc, SinkUnavailable) else str(exc)
                )
                return
            self.last_write_s = time.perf_counter() - start
            self.written += 1

    def _take(self, wait: float = 0.5) -> OutputFrame | None:
        with self._cond:
            if not self._frames and not self._stop.is_set():
                self._cond.wait(wait)
            return self._frames.popleft() if self._frames else None

    def _pace(self, frame: OutputFrame) -> bool:
        """Wait for this frame's slot (pacing.py, as the WebRTC track); False: the sink is stopping."""
        now = time.monotonic()
        self._next = self._playout.slot(frame, self._next, now, self._rate(), self.depth())
        wait = self._next - now
        return not (wait > 0 and self._stop.wait(wait))

    def _fail(self, message: str) -> None:
        self.error = message
        self.state = "error"
        log.warning("sink %s stopped: %s", self.id, message)
        with self._cond:
            self.dropped += len(self._frames)
            self._frames.clear()


def fit_frame(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` at height×width (a device opened at the stream's first size keeps it when the stream's
    resolution changes live): nearest-neighbour, no copy when it already fits."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    rows = (np.arange(height) * h // height).clip(0, h - 1)
    cols = (np.arange(width) * w // width).clip(0, w - 1)
    return image[rows][:, cols]


def rgbx(image: np.ndarray) -> np.ndarray:
    """An RGB [H, W, 3] uint8 image as RGBX [H, W, 4] (opaque), the layout NDI / Spout / Syphon take."""
    out = np.empty((*image.shape[:2], 4), dtype=np.uint8)
    out[..., :3] = image
    out[..., 3] = 255
    return out
