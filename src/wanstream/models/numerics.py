"""Which code a call ran — compiled or eager — so that a replay can run the same (issue 24).

Compiled and eager code give the same results only up to rounding. The optimised path runs a shape eagerly
while its compile is still under way on a helper thread (the Wan VAE at a stream's start, a DiT step after a
live change of the number of steps), so which chunks ran which code depends on timing. A session log records
it, and a replay forces it:

* `record()` (the journal, around each recorded call): every call that ran eager code although the site has
  compiled code (still compiling, or its compile failed) is counted by site — a site is a function and its
  call signature, the same text in every process.
* `force(counts)` (the replay, around the same call): the first `counts[site]` calls of each site run eagerly,
  every other call runs compiled code — waiting for a compile under way rather than running eagerly, since a
  replay has no deadline. Eager runs only ever come first for a site within a call: a shape's compile
  finishes once.

A site calls `note_eager(site)` when it runs eagerly, and, only while `replaying()`, asks `replay_eager(site)`
before each call. Outside `record` and `force` (benchmarks, tests, generate) this costs a thread-local look-up
on the rare eager call and nothing on a compiled one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _State(threading.local):
    recording: dict[str, int] | None = None
    forced: dict[str, int] | None = None


_STATE = _State()


def note_eager(site: str) -> None:
    """A call of `site` ran its eager code although the site has compiled code (counted while recording)."""
    counts = _STATE.recording
    if counts is not None:
        counts[site] = counts.get(site, 0) + 1


def replaying() -> bool:
    """Whether this thread replays: every call runs as `replay_eager` says, waiting for compiles if need be."""
    return _STATE.forced is not None


def replay_eager(site: str) -> bool:
    """While replaying: whether this call of `site` must run its eager code (the recorded call's first ones)."""
    forced = _STATE.forced
    left = forced.get(site, 0) if forced is not None else 0
    if left > 0:
        forced[site] = left - 1  # type: ignore[index]
        return True
    return False


def owes_eager() -> bool:
    """While replaying: whether some calls of this recorded call must still run eager code (until then no CUDA
    graph is warmed up or captured: the live stream ran these steps without one)."""
    forced = _STATE.forced
    return bool(forced) and any(v > 0 for v in forced.values())  # type: ignore[union-attr]


@contextmanager
def paused() -> Iterator[None]:
    """Calls that are not the stream's own (a CUDA graph's warm-up and recording): not counted while recording,
    and compiled while replaying (they consume nothing the recorded call ran)."""
    previous = (_STATE.recording, _STATE.forced)
    _STATE.recording = None
    if _STATE.forced is not None:
        _STATE.forced = {}
    try:
        yield
    finally:
        _STATE.recording, _STATE.forced = previous


@contextmanager
def record() -> Iterator[dict[str, int]]:
    """Count this thread's eager calls of compiled sites (the dict is filled as they happen)."""
    previous, _STATE.recording = _STATE.recording, {}
    try:
        yield _STATE.recording
    finally:
        _STATE.recording = previous


@contextmanager
def force(counts: dict[str, int] | None) -> Iterator[None]:
    """Run this thread's calls as a recorded call ran them (see the module docstring)."""
    previous, _STATE.forced = _STATE.forced, dict(counts or {})
    try:
        yield
    finally:
        _STATE.forced = previous
