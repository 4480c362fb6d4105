"""When the next generated frame goes out: shared by the WebRTC track and the server-side sinks.

Frames leave the engine a chunk at a time; players want them evenly spaced, and a live mirror wants them
at one steady delay behind the camera. So a frame made from an input frame is due at its input's arrival
time plus the stream's playout delay — the delay its chunks have needed lately (`Playout`). The output
then keeps the camera's cadence, and no standing queue builds up: a rate estimate that is a little low
would otherwise let the queue grow by a frame now and then (call 20 measured ≈ 60 ms of such queueing on
top of the engine's latency). A frame whose due time has passed goes at once, at most two per interval
(a hitch drains quickly, without a burst).

Frames without an input frame (text mode, VACE control chunks) are spread at the rate frames leave the
engine instead (`next_slot`): 1/rate after the previous one, sooner when more than a chunk is queued so
the queue never turns into latency, and never more than one interval late (no bursts after a stall).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Protocol

TARGET_DEPTH = 5  # frames queued before pacing speeds up: one chunk (5 at a stream start)
MAX_FPS = 120.0
DEFAULT_FPS = 30.0  # the frame interval assumed before the engine's rate is known
NEED_WINDOW = 32  # chunks the playout delay is estimated over
RECENT = 4  # ... and never above the largest need of this many latest chunks
MAX_DELAY_S = 5.0  # a playout delay above this is a stall, not a stream's latency: send as made


class _Timed(Protocol):
    source_time: float | None  # when its input frame arrived (None: made from no input frame)
    made: float  # when it left the engine


def next_slot(previous: float | None, now: float, rate: float | None, depth: int) -> float:
    """The time (on `now`'s clock) the next frame is due; `previous`: the last frame's slot (None: the first)."""
    if rate is None or previous is None:
        return now
    interval = _interval(rate)
    if depth > TARGET_DEPTH:
        interval *= TARGET_DEPTH / depth
    return max(previous + interval, now - interval)


class Playout:
    """Input-anchored pacing: each frame at its input's arrival + the delay the stream's chunks need.

    A chunk's *need* is its largest input → output time (its first input frame waited for the chunk to fill,
    then the lanes' lag and the compute). The delay is the median need over the last chunks, plus at most one
    frame interval of their spread: steady streams get the least delay that keeps every frame on time, and a
    rare slow chunk (a compile, a hitch) goes out late once instead of raising everyone's latency. It never
    exceeds what the last few chunks needed: after a stretch of slow chunks (a stream compiling new shapes)
    the delay comes back down within RECENT chunks instead of holding frames for what the stalls needed.
    """

    def __init__(self, window: int = NEED_WINDOW) -> None:
        self._needs: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()  # the worker thread observes, the sender (event loop / sink) reads

    def observe(self, frames: Sequence[_Timed]) -> None:
        """A chunk's frames as they left the engine (call once per chunk, before they are paced)."""
        needs = [f.made - f.source_time for f in frames if f.source_time is not None]
        if needs:
            with self._lock:
                self._needs.append(max(needs))

    def delay(self, rate: float | None) -> float | None:
        with self._lock:
            needs = list(self._needs)
        if not needs:
            return None
        ordered = sorted(needs)
        median = ordered[len(ordered) // 2]
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return min(p90, median + _interval(rate), max(needs[-RECENT:]))

    def slot(
        self, frame: _Timed, previous: float | None, now: float, rate: float | None, depth: int
    ) -> float:
        """When `frame` is due (on `now`'s clock); `previous`: the last frame's slot (None: the first)."""
        delay = self.delay(rate)
        if frame.source_time is None or delay is None or delay > MAX_DELAY_S:
            return next_slot(previous, now, rate, depth)
        due = frame.source_time + delay
        if previous is not None:
            due = max(due, previous + 0.5 * _interval(rate))  # late frames drain at twice the rate
        return due

    def clear(self) -> None:
        with self._lock:
            self._needs.clear()


def _interval(rate: float | None) -> float:
    return 1.0 / min(max(rate if rate is not None else DEFAULT_FPS, 1.0), MAX_FPS)
