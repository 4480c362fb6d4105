"""Guards for the optimised GPU path (compiled code, CUDA graphs): it may be slower, never fatal.

What lives here, because both the models (the Wan VAE's background compile, the DiT's compiled block halves
and KV-cache bookkeeping) and the engine (the DiT's CUDA graphs) need it:

* `GATE`, which keeps other threads' GPU work out of a CUDA-graph capture. A capture records every kernel
  launched on its stream; CUDA invalidates it when another thread meanwhile does something that cannot be
  recorded (a device-wide synchronise, a module load, a cuDNN/cuBLAS plan set-up: exactly what a compile's
  warm-up or autotuning does). Before this gate, the Wan VAE's background compile — about a second long
  with a warm compile cache — regularly met the DiT's first capture and killed the stream.
* `FALLBACKS`, the record of every optimisation that failed and was replaced by the slower path: one
  warning per kind of failure and cause, counted for `/metrics` and `bench --json`.
* `CompiledOrEager`, a compiled function that falls back to its eager code, and `COMPILES`, which compiles
  its new shapes off the stream's thread. A compiled function meets a new shape mid-stream when a live change
  alters the DiT step's batch (2 → 3 denoising steps in stream batch: 3 lanes) or the frame size; compiling
  it in line froze a live stream for 10.3 s on an H100 (issue 16). With `background=True`, a shape the
  function has not seen in this process is compiled on a helper thread, from copies of the first call's
  arguments, while calls of that shape run the eager code; later calls use the compiled code. The process's
  very first shape of each function still compiles in line: that is the stream's start-up, which cold start
  measures. `StepGraphs` warms up and captures a DiT step only once nothing it runs is still compiling.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx._symbolic_trace
from torch import nn

from wanstream.models import compile_settings, numerics


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

    def background_elsewhere(self) -> bool:
        """Whether another thread holds background work now (a capture would be deferred)."""
        me = threading.get_ident()
        with self._cond:
            return any(t != me for t in self._background)

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


def _fx_tracing() -> bool:
    """Whether FX is tracing somewhere in the process (a compile on another thread): torch's flag is global."""
    return bool(getattr(torch.fx._symbolic_trace, "_is_fx_tracing_flag", False))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CompiledOrEager:
    """Calls a `torch.compile`d function; if compiling (or its first run) fails, records the failure once
    and calls the eager function from then on. Same arguments, same results up to rounding.

    With `background`, a call signature (see `_signature`) the function has not been compiled for yet is
    compiled by `COMPILES` on its helper thread, and calls with it run the eager function until that is done;
    only the function's first signature in the process compiles in line. Dynamo also specialises on what the
    signature does not see (a module's attributes, e.g. a runtime LoRA's adapters): such a change still
    compiles in line, as without `background`.
    """

    def __init__(
        self,
        compiled: Callable[..., Any],
        eager: Callable[..., Any],
        where: str,
        *,
        background: bool = False,
        lane_args: tuple[int, ...] = (),
    ) -> None:
        """`lane_args`: the positions of the arguments whose first dim is the stream's lane count (a tensor, or a
        tuple of them): 2 to `LANES_MAX` lanes share one compiled graph, see `_mark_lanes`."""
        self.compiled, self.eager, self.where = compiled, eager, where
        self.lane_args = lane_args
        self.failed = False
        if lane_args:
            # Only the dims marked dynamic: dynamo's default would turn any dim dynamic that changed between
            # calls (the token count at a frame-size change), generating slower kernels for every shape.
            compile_settings.want("torch._dynamo.config", "automatic_dynamic_shapes", False)
        # Every (lanes, frames, cache phase) signature compiles once: allow all of them (dynamo's default is 8).
        limit = compile_settings.wanted("torch._dynamo.config", "recompile_limit")
        compile_settings.want("torch._dynamo.config", "recompile_limit", max(limit, 64))
        # "Is FX tracing?" is one process-wide flag: while a compile traces on another thread, calling compiled
        # code would raise ("Detected that you are using FX to symbolically trace a dynamo-optimized function",
        # seen on an H100 at a frame-size change). We never FX-trace compiled code ourselves, and `_compiled`
        # runs such a call's eager code openly.
        compile_settings.want("torch._dynamo.config", "error_on_nested_fx_trace", False)
        # Shared by every wrapper of one eager function: dynamo's compiled code belongs to the function's code
        # (a session rebuilt for a new step count wraps the cache bookkeeping anew, over the same code).
        self.shapes = COMPILES.shapes_of(eager) if background else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key, call = None, -1
        if numerics.counting():  # a session log notes, or a replay runs, which calls ran eager code
            key = _signature(args, kwargs, self.lane_args)
            call = numerics.next_call((self.where, key))
        if numerics.replaying():
            return self._as_recorded(key, call, args, kwargs)
        if self.failed:
            return self._eager(call, args, kwargs)
        if self.shapes is None:
            return self._compiled(call, args, kwargs)
        key = key or _signature(args, kwargs, self.lane_args)
        state = self.shapes.state.get(key)
        if state == READY:  # the steady state: one signature, one dict look-up
            return self._compiled(call, args, kwargs)
        return self._new_shape(key, state, call, args, kwargs)

    def _site(self, args: tuple, kwargs: dict[str, Any]) -> str:
        """This call's site for `models.numerics`: the function and its arguments' shapes, dtypes and strides
        (the same text in any process, whatever its grad mode)."""
        parts = tuple(map(_part, args)) + tuple((k, _part(v)) for k, v in kwargs.items())
        return f"{self.where} {parts}"

    def _eager(self, call: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The eager code where compiled code exists: noted in a session log (`call` >= 0 while recording)."""
        if call >= 0:
            numerics.note_eager(self._site(args, kwargs), call)
        return self.eager(*args, **kwargs)

    def _as_recorded(self, key: tuple | None, call: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A replay: eager where the recorded call ran eager code, else compiled — compiled in line (or its
        background compile waited for) when it is not ready: a replay has no deadline."""
        if self.failed or (numerics.owes_eager() and numerics.replay_eager(self._site(args, kwargs), call)):
            return self.eager(*args, **kwargs)
        if self.shapes is not None:
            key = key or _signature(args, kwargs, self.lane_args)
            if self.shapes.state.get(key) == PENDING:
                COMPILES.wait()
            if self.shapes.state.get(key) == FAILED:
                return self.eager(*args, **kwargs)
            out = self._compiled(call, args, kwargs)
            if not self.failed:
                self.shapes.mark(key, READY)
            return out
        return self._compiled(call, args, kwargs)

    def _new_shape(
        self, key: tuple, state: str | None, call: int, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        if state is None and self.shapes.any_ready and COMPILES.allowed() and not _capturing():  # type: ignore[union-attr]
            state = COMPILES.start(self, key, args, kwargs)
        if state in (PENDING, FAILED):
            if state == PENDING:
                COMPILES.ran_eager()
            return self._eager(call, args, kwargs)
        # The function's first signature, one compiled in the background and not called yet, or INLINE.
        start = time.perf_counter()
        out = self._compiled(call, args, kwargs)
        if not self.failed:
            if state == FRESH and time.perf_counter() - start > COMPILES.slow_first_call_s:
                COMPILES.stats.slow_first_calls += 1
            self.shapes.mark(key, READY)  # type: ignore[union-attr]
        return out

    def _compiled(self, call: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        if _fx_tracing():
            # Another thread's compile is tracing: dynamo would run the eager code now, unseen (its "is FX
            # tracing?" flag is process-wide). Run it openly, so a session log knows and a CUDA graph's warm-up
            # does not count as done (`ran_eager`); a replay waits instead.
            if not numerics.replaying():
                COMPILES.ran_eager()
                return self._eager(call, args, kwargs)
            while _fx_tracing():
                time.sleep(0.001)
        try:
            return self.run_compiled(args, kwargs)
        except Exception as exc:
            if is_out_of_memory(exc) or _capturing():
                raise  # out of memory is not a compile failure; a capture's failure is the capture's to handle
            self.failed = True
            FALLBACKS.record("compile", self.where, exc, "the eager code")
            return self.eager(*args, **kwargs)

    def run_compiled(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The compiled function, called with this process's compile settings in force on this thread (it may
        be new) and the lane dims marked."""
        compile_settings.apply()
        _mark_lanes(args, self.lane_args)
        return self.compiled(*args, **kwargs)


# --- one graph for every lane count from 2 up ---------------------------------------------------------------

# A live steps change in stream batch changes the DiT step's lane count (steps = lanes). Compiled for each
# count, a change to a count not seen yet ran the eager block halves for 1.4-1.9 s while the new count compiled
# (an H100, call 39) and a cold start compiled every count anew. Marked dynamic, the lane dim is one symbol in
# a single graph for 2 to LANES_MAX lanes: a change among them compiles nothing (its CUDA graph is captured,
# as for any new signature). One lane keeps a graph of its own: dynamo specialises sizes 0 and 1 (broadcasts
# depend on them), so a range from 1 would not compile.
LANES_MAX = 8  # the engine's most denoising steps; a larger count gets a graph of its own


def _shares_lane_graph(t: torch.Tensor) -> bool:
    return 2 <= t.shape[0] <= LANES_MAX


def _mark_lanes(args: tuple, positions: tuple[int, ...]) -> None:
    if not positions:
        return
    import torch._dynamo  # only where code is compiled (importing dynamo costs a second)

    for i in positions:
        for t in _tensors(args[i]):
            if _shares_lane_graph(t):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=LANES_MAX)


# --- compiling new shapes off the stream's thread ---------------------------------------------------------

# What a signature of a compiled function is in: compiled; compiling in the background; compiled in the
# background and not called yet; failed (eager for good); to compile in line on its next call.
READY, PENDING, FRESH, FAILED, INLINE = "ready", "pending", "fresh", "failed", "inline"


@dataclass
class _Shapes:
    """The signatures of one function and their states."""

    state: dict[tuple, str] = field(default_factory=dict)
    any_ready: bool = False  # compiled for some signature: later new ones go to the background

    def mark(self, key: tuple, state: str) -> None:
        self.state[key] = state
        self.any_ready = self.any_ready or state in (READY, FRESH)


@dataclass
class CompileStats:
    scheduled: int = 0  # signatures sent to the helper thread
    compiled: int = 0
    failed: int = 0  # also in FALLBACKS ("compile"): those signatures run eagerly from then on
    # The first call of a signature compiled in the background took over `slow_first_call_s`: dynamo compiled
    # it again in line (its guards saw something the helper's call did not). Should stay 0.
    slow_first_calls: int = 0


class GilSharing:
    """While anything compiles beside the stream (heavy Python: dynamo's tracing, Inductor's lowering and code
    generation — the DiT's new shapes on `COMPILES`' helper, the Wan VAE on its own thread), the interpreter
    hands the GIL back sooner. The stream's eager step releases and retakes the GIL at each of its ~2,000 ops,
    and each time the compiling thread holds it, waits up to the switch interval. Measured on the CPU (2,000
    small ops beside a thread running pure Python): a 1.5 s step at a 1 ms interval, 0.54 s at 0.5 ms (the
    server's), 0.25 s at 0.2 ms — while the busy thread kept 98 %, 86 %, 85 % of its pace. Restored when the
    last compile ends; a process already switching at least as often keeps its own interval."""

    switch_s = 0.0002

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._restore: float | None = None  # the interval to put back once nothing compiles

    def hold(self) -> None:
        with self._lock:
            self._holders += 1
            current = sys.getswitchinterval()
            if self._holders == 1 and current > self.switch_s:
                self._restore = current
                sys.setswitchinterval(self.switch_s)

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._restore is not None:
                sys.setswitchinterval(self._restore)
                self._restore = None

    @contextmanager
    def held(self) -> Iterator[None]:
        self.hold()
        try:
            yield
        finally:
            self.release()


GIL = GilSharing()


class BackgroundCompiles:
    """Compiles new signatures of `CompiledOrEager(background=True)` functions on one helper thread, one at
    a time, while the stream's thread runs their eager code.

    The helper calls the compiled function on private copies of the first call's arguments (same shapes,
    strides, dtypes, devices: dynamo's guards then match the stream's calls), under the calling thread's
    grad mode, inside `GATE.background()` (captures wait) and on a stream of its own. The functions must not
    write anything but their arguments. A failure is recorded in FALLBACKS and that signature stays eager; out
    of memory is not a compile failure: that signature then compiles in line on its next call, as it did before
    there was a background. The thread ends when nothing is left to compile (not a daemon: a process that ends
    mid-compile waits for it; a daemon compile thread torn down at exit aborted the process).
    """

    slow_first_call_s = 0.5

    def __init__(self) -> None:
        self.stats = CompileStats()
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], None]] = deque()
        self._pending = 0  # queued or running
        self._thread: threading.Thread | None = None
        self._shapes: dict[Callable[..., Any], _Shapes] = {}
        self._streams: dict[torch.device, Any] = {}
        self._local = threading.local()

    def shapes_of(self, eager: Callable[..., Any]) -> _Shapes:
        with self._cond:
            return self._shapes.setdefault(eager, _Shapes())

    def pending(self) -> bool:
        """Whether any signature is waiting for, or being compiled on, the helper thread."""
        return self._pending > 0

    def allowed(self) -> bool:
        """Whether this thread's new shapes go to the helper now (inside `live_change()`), or compile in line."""
        return getattr(self._local, "live_change", False)

    @contextmanager
    def live_change(self, active: bool = True) -> Iterator[None]:
        """Chunks right after a live change of the stream's shapes (steps, frame size): their new shapes compile
        on the helper while they run eager code. Elsewhere — a stream's start, which cold start and TTFF
        measure — a new shape compiles in line, as the first chunks' graphs need their compiled code."""
        previous = self.allowed()
        self._local.live_change = active
        try:
            yield
        finally:
            self._local.live_change = previous

    def eager_runs(self) -> int:
        """Calls on this thread that ran eager code because their signature was still compiling, or because
        another thread's compile was tracing."""
        return getattr(self._local, "eager", 0)

    def ran_eager(self) -> None:
        self._local.eager = self.eager_runs() + 1

    def start(self, fn: CompiledOrEager, key: tuple, args: tuple, kwargs: dict[str, Any]) -> str:
        """Queue a compile of `fn` for this call's signature; returns the signature's state (PENDING)."""
        assert fn.shapes is not None
        with self._cond:
            state = fn.shapes.state.get(key)
            if state is not None:  # another thread got here first
                return state
            fn.shapes.state[key] = PENDING
            self._pending += 1
            self.stats.scheduled += 1
            if self._pending == 1:
                GIL.hold()
        try:
            job = self._job(fn, key, args, kwargs)
        except Exception:  # copying the arguments failed (out of memory): compile in line, as before
            self._finish(fn, key, INLINE)
            return INLINE
        with self._cond:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="compile-shapes", daemon=False)
                self._thread.start()
        return PENDING

    def _job(
        self, fn: CompiledOrEager, key: tuple, args: tuple, kwargs: dict[str, Any]
    ) -> Callable[[], None]:
        """On the calling thread: copy the arguments and note its grad mode; the job runs on the helper."""
        import torch._dynamo

        # "Is FX tracing?" is one process-wide flag, so the helper's own call holds dynamo's compile lock: while
        # another thread compiles (the VAE, for a new frame size) the flag may be up, and the call would run
        # eagerly, compiling nothing.
        exclusive = getattr(torch._dynamo.convert_frame, "compile_lock", None) or nullcontext()
        scratch: list[Any] = [_scratch(args), _scratch(kwargs)]
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        device = next((a.device for a in _tensors(args)), None)
        copied = None
        if device is not None and device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()  # the copies are queued on this thread's stream

        def job() -> None:
            state = INLINE
            try:
                with GATE.background():
                    try:
                        with (
                            torch.inference_mode(inference),
                            torch.set_grad_enabled(grad),
                            self._helper_stream(device, copied),
                            exclusive,
                        ):
                            fn.run_compiled(scratch[0], scratch[1])
                    finally:
                        scratch.clear()  # freed inside the gate, once the helper's stream is done with them
                state = FRESH
            except Exception as exc:
                if not is_out_of_memory(exc):
                    state = FAILED
                    FALLBACKS.record("compile", f"{fn.where} (in the background)", exc, "the eager code")
            finally:
                self._finish(fn, key, state)

        return job

    @contextmanager
    def _helper_stream(self, device: torch.device | None, copied: Any) -> Iterator[None]:
        if copied is None:
            yield
            return
        with torch.cuda.device(device):
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)  # type: ignore[arg-type]
            stream = self._streams[device]
            stream.wait_event(copied)
            try:
                with torch.cuda.stream(stream):
                    yield
            finally:
                # The copies were made on the stream's thread: they go back to its allocator only once the
                # kernels that read them are done.
                with suppress(Exception):  # an error here is the compile's, already on its way
                    stream.synchronize()

    def _finish(self, fn: CompiledOrEager, key: tuple, state: str) -> None:
        with self._cond:
            fn.shapes.mark(key, state)  # type: ignore[union-attr]
            if state == FRESH:
                self.stats.compiled += 1
            elif state == FAILED:
                self.stats.failed += 1
            self._pending -= 1
            if self._pending == 0:
                GIL.release()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._thread = None
                    return
                job = self._jobs.popleft()
            with suppress(BaseException):  # a job records its own failure; the thread must go on
                job()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is compiling in the background (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {**asdict(self.stats), "pending": self._pending}

    def forget(self) -> None:
        """Forget every signature and count (tests): the next signature of each function compiles in line."""
        self.wait()
        with self._cond:
            for shapes in self._shapes.values():
                shapes.state.clear()
                shapes.any_ready = False
            self.stats = CompileStats()


COMPILES = BackgroundCompiles()


def _signature(args: tuple, kwargs: dict[str, Any], lane_args: tuple[int, ...] = ()) -> tuple:
    """What dynamo specialises a call on, cheaply (a few µs): the grad mode, each tensor's shape, dtype, device
    and strides, plain values (dynamo bakes Python scalars into the graph), the type of anything else (a
    module). The arguments at `lane_args` with 2 to LANES_MAX lanes count as one: one graph serves them."""
    parts = (_lanes_part(a) if i in lane_args else _part(a) for i, a in enumerate(args))
    key = (torch.is_inference_mode_enabled(), torch.is_grad_enabled(), *parts)
    return (key, tuple(kwargs), tuple(map(_part, kwargs.values()))) if kwargs else key


def _lanes_part(a: Any) -> Any:
    if isinstance(a, torch.Tensor) and _shares_lane_graph(a):
        return (("lanes", *a.shape[1:]), a.dtype, a.device, a.stride())
    if isinstance(a, (tuple, list)):
        return tuple(map(_lanes_part, a))
    return _part(a)


_PLAIN = (type(None), bool, int, float, str)


def _part(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.shape, a.dtype, a.device, a.stride())
    if isinstance(a, _PLAIN):
        return a
    if isinstance(a, (tuple, list)):
        return tuple(map(_part, a))
    return type(a)


def _scratch(a: Any) -> Any:
    """A private copy of a call argument for the helper thread: each tensor with its shape, strides, dtype,
    device, inference-ness and requires_grad (what dynamo guards on), and its values (index tensors must stay
    in range); modules and plain values as they are."""
    if isinstance(a, torch.Tensor):
        with torch.inference_mode(a.is_inference()):
            span = 1 + sum((n - 1) * s for n, s in zip(a.shape, a.stride())) if a.numel() else 0
            region = a.detach().as_strided((span,), (1,), a.storage_offset()).clone()
            copy = region.as_strided(a.shape, a.stride())
            return copy.requires_grad_() if a.requires_grad else copy
    if isinstance(a, nn.Module):
        return a
    if isinstance(a, dict):
        return {k: _scratch(v) for k, v in a.items()}
    if isinstance(a, (tuple, list)):
        return type(a)(map(_scratch, a))
    return a


def _tensors(a: Any) -> Iterator[torch.Tensor]:
    if isinstance(a, torch.Tensor):
        yield a
    elif isinstance(a, (tuple, list)):
        for v in a:
            yield from _tensors(v)
