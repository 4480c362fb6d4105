"""Guards for the optimised GPU path (compiled code, CUDA graphs): it may be slower, never fatal.

Two things live here because both the models (the Wan VAE's background compile) and the engine (the DiT's
CUDA graphs) need them:

* `GATE`, which keeps other threads' GPU work out of a CUDA-graph capture. A capture records every kernel
  launched on its stream; CUDA invalidates it when another thread meanwhile does something that cannot be
  recorded (a device-wide synchronise, a module load, a cuDNN/cuBLAS plan set-up: exactly what a compile's
  warm-up or autotuning does). Before this gate, the Wan VAE's background compile — about a second long
  with a warm compile cache — regularly met the DiT's first capture and killed the stream.
* `FALLBACKS`, the record of every optimisation that failed and was replaced by the slower path: one
  warning per kind of failure and cause, counted for `/metrics` and `bench --json`.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


class CaptureGate:
    """Capture vs. other threads' GPU work, as a small reader/writer lock keyed by thread.

    * `work()` — a unit of engine work on some thread (a chunk). A capture waits (briefly) for other
      threads' work to end and holds new work back while it records.
    * `background()` — long work on a helper thread (a compile and its warm-up, tens of seconds when
      cold). A capture never waits for it: it is deferred and tried again on a later call, so a stream
      runs on (uncaptured) instead of stalling.
    * `capture(max_wait)` — yields True when the caller may capture now. One capture at a time; a second
      caller, or one that finds background work running, gets False at once.

    A thread's own holds never block its own capture (captures happen inside a chunk's work).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._work: dict[int, int] = {}  # thread id → nesting depth
        self._background: dict[int, int] = {}
        self._capturer: int | None = None  # thread capturing now, or waiting to

    def _blocked(self, me: int) -> bool:
        return self._capturer is not None and self._capturer != me

    @contextmanager
    def _hold(self, table: dict[int, int]) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if me not in self._work and me not in self._background:  # nested holds never wait
                self._cond.wait_for(lambda: not self._blocked(me))
            table[me] = table.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                table[me] -= 1
                if not table[me]:
                    del table[me]
                self._cond.notify_all()

    def work(self) -> Any:
        return self._hold(self._work)

    def background(self) -> Any:
        return self._hold(self._background)

    @contextmanager
    def capture(self, max_wait: float = 0.5) -> Iterator[bool]:
        me = threading.get_ident()
        with self._cond:
            others_background = any(t != me for t in self._background)
            if self._capturer is not None or others_background:
                granted = False
            else:
                self._capturer = me  # from here on, other threads' new work waits
                deadline = time.monotonic() + max_wait
                granted = self._cond.wait_for(
                    lambda: not any(t != me for t in self._work),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
                if not granted:
                    self._capturer = None
                    self._cond.notify_all()
        try:
            yield granted
        finally:
            if granted:
                with self._cond:
                    self._capturer = None
                    self._cond.notify_all()

    def busy(self) -> dict[str, int]:
        """How many threads hold work / background now (for tests and diagnostics)."""
        with self._cond:
            return {"work": len(self._work), "background": len(self._background)}


GATE = CaptureGate()


@dataclass
class FallbackLog:
    """Every optimisation that failed and was replaced by a slower, correct path."""

    counts: dict[str, int] = field(default_factory=dict)  # kind ("cuda_graph", "compile", ...) → failures
    last: dict[str, str] = field(default_factory=dict)  # kind → "where: cause" of the latest
    _warned: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, where: str, exc: BaseException, instead: str) -> None:
        cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.last[kind] = f"{where}: {cause}"
            first = (kind, type(exc).__name__) not in self._warned  # one warning per kind and cause
            self._warned.add((kind, type(exc).__name__))
        if first:
            warnings.warn(
                f"{kind} failed in {where} ({cause}); running {instead} instead — the stream continues, "
                "slower. Please report this with the GPU, torch version and settings.",
                RuntimeWarning,
                stacklevel=3,
            )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts), "last": dict(self.last)}

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def clear(self) -> None:
        with self._lock:
            self.counts.clear()
            self.last.clear()
            self._warned.clear()


FALLBACKS = FallbackLog()


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory is not a failed optimisation: the slower path would run out too. Let it through."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CompiledOrEager:
    """Calls a `torch.compile`d function; if compiling (or its first run) fails, records the failure once
    and calls the eager function from then on. Same arguments, same results up to rounding."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], where: str) -> None:
        self.compiled, self.eager, self.where = compiled, eager, where
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:
            if is_out_of_memory(exc) or _capturing():
                raise  # out of memory is not a compile failure; a capture's failure is the capture's to handle
            self.failed = True
            FALLBACKS.record("compile", self.where, exc, "the eager code")
            return self.eager(*args, **kwargs)
