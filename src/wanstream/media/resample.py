"""Resampling a stream of timestamped frames onto a constant frame rate (nearest frame by time)."""

from __future__ import annotations

from collections.abc import Iterator

from wanstream.media.frame import TIME_EPS, Frame


def resample(frames: Iterator[Frame], fps: float, last_span: float) -> Iterator[Frame]:
    """Frames on the grid i/fps: each tick takes the input frame nearest in time (ties: the earlier one).

    The input lasts until its last frame's time + `last_span` (one average frame); ticks stop there, so a
    constant-rate input resampled to its own rate comes out frame for frame.
    """
    prev = next(frames, None)
    if prev is None:
        return
    tick = 0
    for frame in frames:
        middle = (prev.time + frame.time) / 2
        while tick / fps <= middle + TIME_EPS:
            yield Frame(prev.image, tick / fps)
            tick += 1
        prev = frame
    end = prev.time + last_span
    while tick / fps < end - TIME_EPS:
        yield Frame(prev.image, tick / fps)
        tick += 1
