"""How the project measures: the one percentile and the one stage timer.

Every p50 / p90 the product reports — `generate --stats-json`, `bench --json`, the ring bench, `/metrics` and
the session stats of the server — is `percentile` of the same kind of samples, so "p90 chunk latency" means
one thing everywhere. Both live in the engine, the lowest layer that measures, so every layer above can use
them (the session itself takes a `StageTimer` as its `stage_timer`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def percentile(values: Iterable[float], q: float) -> float:
    """The q-quantile (q a fraction, 0-1: 0.9 is p90) of the values, in any order: linear interpolation
    between the two closest ranks, numpy's default (`numpy.quantile(values, q)`). Of [1, 2, 3, 4], p50 is
    2.5 and p90 is 3.7. Raises ValueError on no values (callers say what an empty window reports)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile: q is a fraction from 0 to 1 (0.9 for p90), not {q}")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


class StageTimer:
    """CUDA-event intervals per named stage (host clock on CPU); read after a synchronize.

    With `wall=True` it synchronises around each stage and measures wall time instead (start-up
    diagnosis: compile, autotune and graph capture happen on the host).
    """

    def __init__(self, device: torch.device, wall: bool = False) -> None:
        self.cuda = device.type == "cuda" and not wall
        self.sync = device.type == "cuda" and wall
        self.marks: dict[str, list[tuple[Any, Any]]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = self._stamp()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.marks.setdefault(name, []).append((start, self._stamp()))

    def _stamp(self) -> Any:
        return stamp(self.cuda)

    def take_ms(self) -> dict[str, list[float]]:
        """Milliseconds per interval, then forget them (call after a synchronize)."""
        out = {name: [elapsed_ms(a, b) for a, b in pairs] for name, pairs in self.marks.items()}
        self.marks.clear()
        return out


def stamp(cuda: bool) -> Any:
    """A point in time: a recorded CUDA event on the current stream (no sync), else the host clock."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start: Any, end: Any) -> float:
    """Milliseconds between two `stamp`s of one kind (CUDA events: after a synchronize)."""
    if isinstance(start, float):
        return (end - start) * 1000
    return start.elapsed_time(end)
