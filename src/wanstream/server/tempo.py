"""The server's musical clock: a tempo (BPM, bar length, beat phase) that prompt changes and timeline
segments can be quantised to, set by hand, by tap tempo, or followed from Ableton Link.

One clock per server (a rig plays to one tempo). Beats are read on `time.monotonic()`'s timeline, so the
engine worker can turn "the next downbeat" into the chunk that starts nearest to it (`lands`).

Ableton Link (`pip install "wanstream[link]"`, the `aalink` package) is imported only when it is switched
on: it joins the local network's Link session by multicast, so it is off by default and never on in tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("wanstream.server")

Quantize = Literal["off", "beat", "bar"]
TAP_RESET_S = 2.0  # a pause longer than this between taps starts a new tap series
MAX_TAPS = 8  # the tempo is the mean interval of the last taps of a series


class TempoUpdate(BaseModel):
    """A change of the server's tempo (REST `PUT /api/v1/tempo`, OSC `/wanstream/tempo/...`)."""

    model_config = ConfigDict(extra="forbid")

    bpm: float | None = Field(None, ge=20.0, le=999.0, description="Beats per minute.")
    quantum: int | None = Field(None, ge=1, le=16, description="Beats in a bar (Link's quantum; 4 for 4/4).")
    quantize: Quantize | None = Field(
        None,
        description="Where prompt changes and timeline segments land by default: 'off' (at once), 'beat' "
        "(the next beat) or 'bar' (the next downbeat). A live update's own `quantize` wins.",
    )
    link: bool | None = Field(
        None, description="Follow Ableton Link (needs the 'link' extra; joins the LAN's Link session)."
    )


class TempoStatus(BaseModel):
    bpm: float
    quantum: int
    quantize: Quantize
    beat: float = Field(description="The current beat (counting from the last downbeat set or tapped).")
    phase: float = Field(description="Where in the bar we are, in beats (0 = the downbeat).")
    link: bool
    link_peers: int | None = Field(None, description="Other Link apps in the session (null: Link off).")
    link_error: str | None = Field(None, description="Why Link could not be switched on.")


class LinkUnavailable(RuntimeError):
    """Ableton Link was asked for but its package is not installed."""


def next_boundary(beat: float, beats: float) -> float:
    """The first multiple of `beats` at or after `beat` (a beat within a millisecond-ish of one is on it)."""
    eps = 1e-6
    return math.ceil(beat / beats - eps) * beats


def lands(next_chunk_start: float, chunk_seconds: float, due: float) -> bool:
    """Whether a change due at `due` (monotonic seconds) takes effect on the chunk starting next: the
    chunk whose start is nearest the due time gets it (earlier chunks keep the old state)."""
    return next_chunk_start >= due - chunk_seconds / 2


def tap_tempo(taps: list[float]) -> float | None:
    """BPM from tap times (seconds, one series, oldest first): the mean interval; None before two taps."""
    if len(taps) < 2:
        return None
    return 60.0 * (len(taps) - 1) / (taps[-1] - taps[0])


class Tempo:
    """The server's beat clock (thread-safe: the engine threads read it, the event loop changes it)."""

    def __init__(self, bpm: float = 120.0, quantum: int = 4, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self.bpm = bpm
        self.quantum = quantum
        self.quantize: Quantize = "off"
        self._origin = clock()  # the monotonic time of beat 0 (a downbeat)
        self._taps: list[float] = []
        self._link: Any = None
        self.link_error: str | None = None

    # -- reading -------------------------------------------------------------------------------------
    def beat_at(self, t: float) -> float:
        link = self._link
        if link is not None:  # Link's beat now, extrapolated on its tempo (Link keeps it monotonic)
            now = self.clock()
            return float(link.beat) + (t - now) * float(link.tempo) / 60.0
        with self._lock:
            return (t - self._origin) * self.bpm / 60.0

    def time_of(self, beat: float) -> float:
        now = self.clock()
        return now + (beat - self.beat_at(now)) * 60.0 / self.current_bpm()

    def current_bpm(self) -> float:
        link = self._link
        return float(link.tempo) if link is not None else self.bpm

    def due(self, quantize: Quantize, after: float) -> float | None:
        """The monotonic time of the first beat (or downbeat) at or after `after`; None for 'off'."""
        if quantize == "off":
            return None
        beats = 1.0 if quantize == "beat" else float(self.quantum)
        return self.time_of(next_boundary(self.beat_at(after), beats))

    def status(self) -> TempoStatus:
        now = self.clock()
        beat = self.beat_at(now)
        link = self._link
        return TempoStatus(
            bpm=round(self.current_bpm(), 3),
            quantum=self.quantum,
            quantize=self.quantize,
            beat=round(beat, 3),
            phase=round(beat % self.quantum, 3),
            link=link is not None,
            link_peers=int(link.num_peers) if link is not None else None,
            link_error=self.link_error,
        )

    # -- changing ------------------------------------------------------------------------------------
    def update(self, change: TempoUpdate, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Apply a validated change (raises LinkUnavailable, changing nothing, when Link cannot start)."""
        if change.link is not None:
            self.set_link(change.link, loop)
        if change.bpm is not None:
            self._set_bpm(change.bpm)
        if change.quantum is not None:
            self.quantum = change.quantum
            if self._link is not None:
                self._link.quantum = change.quantum
        if change.quantize is not None:
            self.quantize = change.quantize

    def _set_bpm(self, bpm: float) -> None:
        now = self.clock()
        with self._lock:  # keep the current beat where it is: only the speed changes from now on
            beat = (now - self._origin) * self.bpm / 60.0
            self.bpm = bpm
            self._origin = now - beat * 60.0 / bpm
        if self._link is not None:
            self._link.tempo = bpm

    def downbeat(self) -> None:
        """Now is the start of a bar (a performer's "one"); with Link, Link's phase rules instead."""
        with self._lock:
            self._origin = self.clock()

    def tap(self) -> float | None:
        """One tap: taps of a series set the tempo (their mean interval) and the phase (the first tap of
        the series is a downbeat and the last one a beat). Returns the tempo once there are two taps."""
        now = self.clock()
        if self._taps and now - self._taps[-1] > TAP_RESET_S:
            self._taps = []
        self._taps = [*self._taps, now][-MAX_TAPS:]
        if len(self._taps) == 1:
            with self._lock:
                self._origin = now  # the first tap of a series is a downbeat
            return None
        bpm = tap_tempo(self._taps)
        if bpm is None or not 20.0 <= bpm <= 999.0:
            return None
        with self._lock:
            self.bpm = bpm
            # The first tap of the series on a downbeat: whole bars back from it keep it one.
            self._origin = self._taps[0]
        if self._link is not None:
            self._link.tempo = bpm
        return bpm

    def set_link(self, on: bool, loop: asyncio.AbstractEventLoop | None) -> None:
        if not on:
            link, self._link = self._link, None
            if link is not None:
                link.enabled = False
            return
        if self._link is not None:
            return
        try:
            from aalink import Link
        except ImportError:
            self.link_error = (
                "Ableton Link needs the 'link' extra: pip install \"wanstream[link]\" (the aalink package)"
            )
            raise LinkUnavailable(self.link_error) from None
        link = Link(self.bpm, loop or asyncio.get_running_loop())
        link.quantum = self.quantum
        link.enabled = True
        self.link_error = None
        self._link = link
        log.info("Ableton Link on (%.1f BPM)", self.bpm)
