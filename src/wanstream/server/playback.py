"""Server-side timeline playback: a session plays a timeline on its own, steered over REST or OSC (play,
stop, seek) without a browser open.

When the playhead enters a segment, its prompts (and transition) go to the engine as an ordinary live
update, through the same worker entry point as every other control channel, so they are validated the
same way, land in the event log and in recordings, and follow the server's tempo: with `quantize` set to
'beat' or 'bar' a segment switch lands on the chunk nearest the next beat or downbeat.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from wanstream.server.schemas import Control
from wanstream.server.worker import ControlRejected, EngineWorker
from wanstream.timeline import Segment, Timeline

MAX_WAIT_S = 1.0  # the player re-reads its position at least this often (a seek wakes it at once)


class PlayerStatus(BaseModel):
    name: str
    segments: int
    duration: float | None = Field(description="Seconds (null: the last segment is open-ended).")
    position: float = Field(description="The playhead, in seconds.")
    playing: bool
    loop: bool
    segment: int | None = Field(description="The segment last sent (0-based; null before the first).")
    sent: int = Field(description="Segment updates sent to the stream.")
    error: str | None = Field(None, description="Why the last segment update was refused, if it was.")


class TimelinePlayer:
    """Plays one timeline against one session's worker (event-loop side only)."""

    def __init__(
        self,
        timeline: Timeline,
        worker: EngineWorker,
        spawn: Callable[[Any, str], asyncio.Task[Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeline = timeline
        self._worker = worker
        self._spawn = spawn
        self._clock = clock
        self.position = 0.0
        self.playing = False
        self.loop = False
        self.current: int | None = None
        self.sent = 0
        self.error: str | None = None
        self._origin = 0.0
        self._task: asyncio.Task[Any] | None = None
        self._moved = asyncio.Event()

    def play(self, loop: bool | None = None) -> None:
        if loop is not None:
            self.loop = loop
        if self.playing:
            return
        if self.position >= self.timeline.duration:
            self.position = 0.0
        self.playing = True
        self._origin = self._clock() - self.position
        self.current = None  # the segment under the playhead is sent when play starts
        self._task = self._spawn(self._run(), "timeline")

    def stop(self) -> None:
        if self.playing:
            self.position = self._now()
        self.playing = False
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def seek(self, t: float) -> None:
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"seek to {t}: give seconds from the timeline's start (0 or more)")
        self.position = min(t, self.timeline.duration)
        if self.playing:
            self._origin = self._clock() - self.position
            self.current = None
            self._moved.set()

    def status(self) -> PlayerStatus:
        duration = self.timeline.duration
        return PlayerStatus(
            name=self.timeline.source,
            segments=len(self.timeline.segments),
            duration=duration if math.isfinite(duration) else None,
            position=round(self._now() if self.playing else self.position, 3),
            playing=self.playing,
            loop=self.loop,
            segment=self.current,
            sent=self.sent,
            error=self.error,
        )

    def _now(self) -> float:
        return self._clock() - self._origin

    async def _run(self) -> None:
        segments = self.timeline.segments
        while self.playing:
            self._moved.clear()
            position = self._now()
            if position >= self.timeline.duration:
                if not self.loop:
                    self.position, self.playing, self._task = self.timeline.duration, False, None
                    return
                self._origin, self.current, position = self._clock(), None, 0.0
            index = self.timeline.index_at(position)
            if index != self.current:
                self.current = index
                self._send(segments[index])
            following = segments[index + 1].start if index + 1 < len(segments) else self.timeline.duration
            wait = min(max(following - position, 0.0), MAX_WAIT_S)
            with contextlib.suppress(TimeoutError):  # woken early by a seek
                await asyncio.wait_for(self._moved.wait(), wait)

    def _send(self, segment: Segment) -> None:
        body: dict[str, Any] = {"prompts": [p.model_dump() for p in segment.prompts]}
        transition = segment.transition
        if transition is not None:
            body["transition"] = transition.model_dump()
        if segment.vace_context_scale is not None:
            body["vace_context_scale"] = segment.vace_context_scale
        self.sent += 1
        try:
            message = Control.model_validate(body)
        except ValueError as exc:
            self.error = str(exc)
            return
        # Not awaited: a quantised segment is acknowledged on its beat, and the playhead moves on meanwhile.
        self._worker.control(message).add_done_callback(self._settled)

    def _settled(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            future.result()
        except ControlRejected as exc:
            self.error = str(exc)
        else:
            self.error = None
