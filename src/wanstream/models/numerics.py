"""Which code a call ran — compiled or eager — so that a replay can run the same (issue 24).

Compiled and eager code give the same results only up to rounding. The optimised path runs a shape eagerly
while its compile is still under way on a helper thread (the Wan VAE at a stream's start, a DiT step after a
live change of the number of steps), so which chunks ran which code depends on timing. A session log records
it, and a replay forces it:

* `record()` (the journal, around each recorded call): every call that ran eager code although the site has
  compiled code (still compiling, its compile failed, or another thread's compile was tracing) is noted by
  site — a function and its call signature, the same text in every process — and by its place among the
  recorded call's calls of that site (0, 1, ...).
* `force(eager)` (the replay, around the same call): exactly those calls run eagerly, every other one runs
  compiled code — waiting for a compile under way rather than running eagerly, since a replay has no deadline.
  The place matters, not only the number: a compile on another thread can make a call in the middle of a
  recorded call run eager code (torch's "is FX tracing?" flag is process-wide), between compiled ones.

The same holds for CUDA graphs: the stream captures a step's graph only once nothing compiles (a graph over
eager code would stay slow), so which steps replayed a graph depends on timing too, and a graph's kernels may
round otherwise than the same step launched directly. The log notes which steps (by their place among the
recorded call's steps) replayed a graph (`note_graph`), and the replay runs exactly those on a graph
(`replay_graph`), capturing it then if need be.

A site counts its call with `next_call(key)` while `counting()` (`key`: anything hashable that names the site,
cheaper than its text), calls `note_eager(site, call)` when it runs eagerly, and, while `replaying()`, asks
`replay_eager(site, call)` before each call. Outside `record` and `force` (benchmarks, tests, generate) this
costs two thread-local look-ups a call.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Ran:
    """How one recorded call ran where it could have run otherwise."""

    # site -> the places of its calls that ran eager code; the places of the DiT steps that replayed a graph
    eager: dict[str, list[int]] = field(default_factory=dict)
    graphs: list[int] = field(default_factory=list)


class _State(threading.local):
    recording: Ran | None = None
    forced: dict[str, set[int]] | None = None  # site -> the places of the calls still to run eager code
    forced_graphs: set[int] | None = None  # the steps that ran on a graph (None: not recorded, free choice)
    calls: dict[Hashable, int] | None = None  # site key -> calls so far, within one recorded call


_STATE = _State()


def counting() -> bool:
    """Whether this thread's calls of compiled sites are counted (a recorded or replayed call runs)."""
    return _STATE.calls is not None


def next_call(key: Hashable) -> int:
    """This call's place among the calls of its site (named by `key`) within the recorded call: 0, 1, ..."""
    calls = _STATE.calls
    if calls is None:
        return -1
    n = calls.get(key, 0)
    calls[key] = n + 1
    return n


def note_eager(site: str, call: int) -> None:
    """Call `call` of `site` ran its eager code although the site has compiled code (noted while recording)."""
    ran = _STATE.recording
    if ran is not None:
        ran.eager.setdefault(site, []).append(call)


def note_graph(step: int) -> None:
    """Step `step` (its place among the recorded call's DiT steps) replayed a CUDA graph (noted while
    recording)."""
    ran = _STATE.recording
    if ran is not None and step >= 0:
        ran.graphs.append(step)


def replay_graph(step: int) -> bool | None:
    """While replaying: whether step `step` ran on a CUDA graph live; None when the log does not say (a log
    written before graphs were noted) or no replay runs."""
    forced = _STATE.forced_graphs
    if forced is None or step < 0:
        return None
    return step in forced


def replaying() -> bool:
    """Whether this thread replays: every call runs as `replay_eager` says, waiting for compiles if need be."""
    return _STATE.forced is not None


def replay_eager(site: str, call: int) -> bool:
    """While replaying: whether call `call` of `site` must run its eager code (as the recorded one did)."""
    places = _STATE.forced.get(site) if _STATE.forced else None
    if places and call in places:
        places.discard(call)
        return True
    return False


def owes_eager() -> bool:
    """While replaying: whether some calls of this recorded call must still run eager code (until then no CUDA
    graph is warmed up or captured: the live stream ran these steps without one)."""
    forced = _STATE.forced
    return bool(forced) and any(forced.values())  # type: ignore[union-attr]


@contextmanager
def paused() -> Iterator[None]:
    """Calls that are not the stream's own (a CUDA graph's warm-up and recording): neither counted nor noted
    while recording, and compiled while replaying (they take no place of the recorded call's)."""
    previous = (_STATE.recording, _STATE.forced, _STATE.forced_graphs, _STATE.calls)
    _STATE.recording = _STATE.calls = _STATE.forced_graphs = None
    if _STATE.forced is not None:
        _STATE.forced = {}
    try:
        yield
    finally:
        _STATE.recording, _STATE.forced, _STATE.forced_graphs, _STATE.calls = previous


@contextmanager
def record() -> Iterator[Ran]:
    """Note how this thread's calls ran (the `Ran` is filled as they happen)."""
    previous = (_STATE.recording, _STATE.calls)
    _STATE.recording, _STATE.calls = Ran(), {}
    try:
        yield _STATE.recording
    finally:
        _STATE.recording, _STATE.calls = previous


@contextmanager
def force(eager: dict[str, list[int]] | None, graphs: list[int] | None = None) -> Iterator[None]:
    """Run this thread's calls as a recorded call ran them (see the module docstring); `graphs` None: the
    log did not note graphs, so the replay uses them as it can."""
    previous = (_STATE.forced, _STATE.forced_graphs, _STATE.calls)
    _STATE.forced = {site: set(places) for site, places in (eager or {}).items()}
    _STATE.forced_graphs = set(graphs) if graphs is not None else None
    _STATE.calls = {}
    try:
        yield
    finally:
        _STATE.forced, _STATE.forced_graphs, _STATE.calls = previous
