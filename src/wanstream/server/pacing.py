"""When the next generated frame goes out: shared by the WebRTC track and the server-side sinks.

Frames leave the engine a chunk at a time; players want them evenly spaced. Each frame's slot is 1/rate after
the previous one (rate: frames per second leaving the engine), sooner when more than a chunk is queued so the
queue never turns into latency, and never more than one interval late (no bursts after a stall).
"""

from __future__ import annotations

TARGET_DEPTH = 5  # frames queued before pacing speeds up: one chunk (5 at a stream start)
MAX_FPS = 120.0


def next_slot(previous: float | None, now: float, rate: float | None, depth: int) -> float:
    """The time (on `now`'s clock) the next frame is due; `previous`: the last frame's slot (None: the first)."""
    if rate is None or previous is None:
        return now
    interval = 1.0 / min(max(rate, 1.0), MAX_FPS)
    if depth > TARGET_DEPTH:
        interval *= TARGET_DEPTH / depth
    return max(previous + interval, now - interval)
