"""CUDA graphs over whole DiT steps: one capture per static call signature, replayed every chunk.

A DiT step launches ~a thousand kernels; replaying a captured graph costs one launch, so the host is
never the bottleneck. What may differ between calls lives in fixed device buffers that the capture
reads: the noisy input and timesteps (copied in), the cache plan (the cache's own staging buffer),
the text K/V (copied in when the prompt changes), the KV cache itself, and a conditioning extension's
tensors (VACE: its context, scale and text K/V; see `StreamExtension.graph_key`): copied in when they are
other tensors than the last call's, so a new control frame or scale replays the same graph, while a new
shape (or an extension that changes the kernels) is a new signature.

A capture is prepared and made safely:
* Warm-up runs the step twice on the very stream that will capture, so compiling, autotuning and every
  first use of a cuBLAS/cuDNN handle, plan or workspace on that stream happen before recording, never inside
  it. Warming up advances the cache's device state: the cache is saved before and restored after (once per
  signature; recording itself runs no kernels).
* Recording waits for other threads' GPU work to stop (`fastpath.GATE`): a compile warming up on another
  thread invalidates a capture. If such work is running, warming up and capturing are deferred and this call
  runs the compiled step directly; a later call captures.
* A step whose compiled code is not ready is neither warmed up nor captured: a graph recorded over the eager
  code would stay slow for good, and a signature warmed up on the eager code would meet the compiled code's
  first use inside the recording. A new shape mid-stream compiles in the background (`fastpath.COMPILES`):
  while anything compiles there, new signatures run uncaptured (stats `deferred`); a warm-up whose step ran
  eager code — for a shape just sent there, or because another thread's compile was tracing — stops after its
  first run, and the cache is put back. Once nothing compiles, the next call warms up on the compiled code
  and captures.
* Recording uses CUDA's thread-local capture mode: another thread's allocation (the caching allocator is
  capture-aware) does not invalidate it.
* A stream's first chunk is never warmed up or recorded: that would cost its first frame a warm-up and a
  recording (an H100, call 36: a reset stream's first frame took 258–310 ms where the capture ran then, 127 ms
  where it had run before). It runs the compiled step without a graph unless its signature (two latents, an
  empty cache) was captured before. Such a call is remembered and captured at a later call of the same stream
  (one signature per call, once nothing compiles), so every later stream of the session — after a reset or a
  hard cut — replays it in its first chunk. Uncaptured, its steps launch every kernel from the host: at 3–4
  steps a reset's first frame took 191–362 ms (call 39); captured so, ≤ 201 ms in all 48 configs (call 40).
  (A replay of a take runs such a step on a graph where the take's log says the live stream did.)
* A session log notes which steps replayed a graph, and its replay runs exactly those on one (capturing it
  then, waiting for compiles: a replay has no deadline), the others directly (`models.numerics`): when the live
  stream captured depends on timing, and a graph may round otherwise than the step launched directly.
* If capturing fails anyway, that signature runs the compiled step without a graph from then on, with one
  warning naming the cause (counted in `fastpath.FALLBACKS`: `/metrics`, `bench --json`). The output is the
  same; only the launch overhead returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wanstream.models import numerics
from wanstream.models.dit import CrossKV, StreamExtension
from wanstream.models.fastpath import COMPILES, FALLBACKS, GATE, is_out_of_memory
from wanstream.models.kv_cache import CallPlan, KVCache

Step = Callable[
    [torch.Tensor, torch.Tensor, CrossKV, CallPlan, StreamExtension | None], tuple[torch.Tensor, torch.Tensor]
]
Outputs = tuple[torch.Tensor, torch.Tensor]


class _Compiling(Exception):
    """A warm-up run used eager code for a shape that compiles in the background: not warm yet."""


@dataclass
class _StaticInputs:
    """An extension's tensors as a graph reads them: static copies, refreshed from each call's tensors."""

    extension: StreamExtension | None  # the extension over `buffers` (what the graph runs)
    buffers: list[torch.Tensor]
    sources: list[torch.Tensor]  # the call tensor each buffer holds a copy of now

    @classmethod
    def of(cls, extension: StreamExtension | None) -> _StaticInputs:
        if extension is None:
            return cls(None, [], [])
        tensors = extension.graph_inputs()
        buffers = [t.clone() for t in tensors]
        return cls(extension.reading(buffers), buffers, list(tensors))

    def load(self, extension: StreamExtension | None) -> None:
        tensors = extension.graph_inputs() if extension is not None else []
        for i, (buf, src) in enumerate(zip(self.buffers, tensors, strict=True)):
            # Inputs are values (never edited in place once handed over; the session's are made per chunk or
            # per prompt): the very tensor of the last call is already there, e.g. the prompt's text K/V.
            if self.sources[i] is not src:
                buf.copy_(src)
                self.sources[i] = src


@dataclass
class _FirstChunkCall:
    """A stream's first-chunk call not captured yet: what its capture at a later call needs."""

    x: torch.Tensor
    t: torch.Tensor
    plan: CallPlan
    extension: StreamExtension | None
    ext_key: tuple


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph (anything with .replay())
    x: torch.Tensor
    t: torch.Tensor
    inputs: _StaticInputs
    outputs: Outputs


@dataclass
class GraphStats:
    captured: int = 0  # signatures captured
    replays: int = 0
    deferred: int = 0  # calls run without a graph because a compile was running (another thread's, or ours)
    failed: int = 0  # signatures whose capture failed (they run without a graph)
    stream_start: int = 0  # calls of a stream's first chunk that ran without a graph (not captured yet)
    later: int = 0  # of `captured`, a stream's first-chunk signatures captured at a later call


class StepGraphs:
    device_type = "cuda"
    capture_wait_s = 0.5  # longest wait for other threads' chunks before deferring a capture

    def __init__(self, cache: KVCache, step: Step) -> None:
        self.cache = cache
        self.step = step
        self.stats = GraphStats()
        self._graphs: dict[tuple, _Captured] = {}
        self._warm: set[tuple] = set()
        self._failed: set[tuple] = set()
        # An extension's static inputs, shared by every signature with the same extension part (graphs replay
        # one at a time, like the shared text K/V): the VACE text K/V are 47 MB at full size.
        self._inputs: dict[tuple, _StaticInputs] = {}
        self._later: dict[tuple, _FirstChunkCall] = {}  # by signature: captured at a later call
        self._pool: Any = None
        self._stream: Any = None
        self._cross: CrossKV | None = None  # static copies of the text K/V the graphs read
        self._cross_source: CrossKV | None = None

    def eligible(self, x: torch.Tensor, plan: CallPlan, extension: StreamExtension | None = None) -> bool:
        return (
            x.device.type == self.device_type
            and plan.mask is None
            and plan.table.device == x.device
            and (extension is None or extension.graph_key(x) is not None)
        )

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross: CrossKV,
        plan: CallPlan,
        extension: StreamExtension | None = None,
        *,
        capture: bool = True,
    ) -> Outputs:
        """One step: replayed on its graph, captured now if it may be, or run directly. `capture` False: a
        stream's first chunk — run directly unless its graph exists (see the module docstring)."""
        self._load_cross(cross)
        step = numerics.next_call("DiT step")
        # A replay runs each step as the live stream did: on a graph or not (models/numerics.py). A log that
        # does not say: no graph while the recorded call still owes eager calls.
        as_live = numerics.replay_graph(step)
        if as_live is False or (as_live is None and numerics.owes_eager()):
            return self.step(x, t, self._cross, plan, extension)  # type: ignore[arg-type]
        ext_key = self._extension_key(x, extension)
        key = (
            tuple(x.shape),
            x.dtype,
            plan.frames,
            plan.max_valid,
            plan.sink_check,
            plan.any_full,
            plan.any_append,
            plan.table.data_ptr(),
            *ext_key,
        )
        if capture and self._later and as_live is None:
            self._capture_later()
        captured = self._graphs.get(key)
        if captured is None and key not in self._failed and (capture or as_live):
            captured = self._try_capture(key, x, t, plan, extension, ext_key, now=bool(as_live))
        if captured is None:
            if not capture:
                self.stats.stream_start += 1
                if key not in self._failed and key not in self._later and as_live is None:
                    # x and t copied; the extension's tensors are values, never edited in place once handed over
                    # (see `_StaticInputs.load`): kept as they are.
                    self._later[key] = _FirstChunkCall(x.clone(), t.clone(), plan, extension, ext_key)
            return self.step(x, t, self._cross, plan, extension)  # type: ignore[arg-type]
        captured.x.copy_(x)
        captured.t.copy_(t)
        captured.inputs.load(extension)
        captured.graph.replay()
        self.stats.replays += 1
        numerics.note_graph(step)
        x0, flow = captured.outputs
        return x0.clone(), flow.clone()  # the next replay overwrites the static outputs

    def _capture_later(self) -> None:
        """Capture one remembered first-chunk signature (its warm-up puts the cache back); kept for a later call
        while it is deferred. Its plan's table is the cache's staging buffer for that shape: whatever plan of the
        shape it holds now, a warm-up reads valid slots, and the graph reads the buffer at each replay."""
        key, call = next(iter(self._later.items()))
        if key not in self._graphs and key not in self._failed:
            captured = self._try_capture(key, call.x, call.t, call.plan, call.extension, call.ext_key)
            if captured is None and key not in self._failed:
                return  # deferred: compiles are running, or another thread is capturing
            if key in self._graphs:
                self.stats.later += 1
        del self._later[key]

    @staticmethod
    def _extension_key(x: torch.Tensor, extension: StreamExtension | None) -> tuple[Any, ...]:
        """The extension's part of a signature: its own key, and the shape and dtype of every tensor it reads."""
        if extension is None:
            return (None,)
        key = extension.graph_key(x)
        if key is None:
            raise ValueError(f"{type(extension).__name__}: this call cannot be captured (check eligible())")
        return (key, tuple((tuple(v.shape), v.dtype, v.device) for v in extension.graph_inputs()))

    def _load_cross(self, cross: CrossKV) -> None:
        if self._cross_source is cross:
            return
        if self._cross is None or any(a.shape != b.shape for a, b in zip(self._cross.k, cross.k)):
            if self._graphs:  # captured graphs read the old buffers: they cannot be reused
                self._graphs.clear()
            self._cross = CrossKV([k.clone() for k in cross.k], [v.clone() for v in cross.v])
        else:
            for dst, src in zip(self._cross.k + self._cross.v, cross.k + cross.v):
                dst.copy_(src)
        self._cross_source = cross

    def _try_capture(
        self,
        key: tuple,
        x: torch.Tensor,
        t: torch.Tensor,
        plan: CallPlan,
        extension: StreamExtension | None,
        ext_key: tuple,
        *,
        now: bool = False,
    ) -> _Captured | None:
        """`now`: a replay must run this step on a graph, as the live stream did: it waits for compiles
        rather than defer (a replay has no deadline)."""
        assert self._cross is not None
        if now:
            COMPILES.wait()
        elif key not in self._warm and (
            COMPILES.pending() or GATE.background_elsewhere() or numerics.owes_eager()
        ):
            # Its warm-up would run eager code, or its recording be deferred; or a replay must run this step's
            # eager code as the live stream did (models/numerics.py): no graph over it. (Warming up beside
            # another thread's compile — the Wan VAE's at a stream's start — would spare a fresh stream's first
            # chunk after a reset its warm-up, 238 → 151 ms TTFF in call 29, but the warm-up's copy of the KV
            # cache then meets the compile's memory: peak 18.3 GiB instead of 15.2.)
            self.stats.deferred += 1
            return None
        cross = self._cross
        static_x, static_t = x.clone(), t.clone()
        static = self._inputs.get(ext_key)
        if static is None:
            static = self._inputs[ext_key] = _StaticInputs.of(extension)
        static.load(extension)
        ext = static.extension
        try:
            if key not in self._warm:
                # Warming up runs the step: save the cache (its K/V are GBs at full size: only here, once per
                # signature, never on a deferred call) and put it back.
                saved = {name: buf.clone() for name, buf in self.cache.state()["buffers"].items()}
                eager_before = COMPILES.eager_runs()

                def run() -> Outputs:
                    outputs = self.step(static_x, static_t, cross, plan, ext)
                    if COMPILES.eager_runs() != eager_before:
                        raise _Compiling  # a shape of this step went to the background compile
                    return outputs

                try:
                    with numerics.paused():  # not the stream's own calls: a session log does not count them
                        self._warm_up(run)
                finally:
                    self._restore(saved)
                    del saved
                self._warm.add(key)
            with GATE.capture(self.capture_wait_s) as granted:
                if not granted:
                    self.stats.deferred += 1
                    return None
                # Recording runs no kernels: the cache is untouched, also when it fails.
                with numerics.paused():
                    graph, outputs = self._record(lambda: self.step(static_x, static_t, cross, plan, ext))
        except _Compiling:
            self.stats.deferred += 1
            return None
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            self._failed.add(key)
            self.stats.failed += 1
            # Later captures start on a new pool and stream: a broken capture can leave the allocator routing
            # the old stream's allocations to the old pool ("already recording to mempool", seen on an H100).
            self._pool = self._stream = None
            FALLBACKS.record(
                "cuda_graph",
                f"DiT step capture (lanes×frames {tuple(x.shape[:2])}, cache {plan.max_valid} tokens"
                + (f", {type(extension).__name__}" if extension is not None else "")
                + ")",
                exc,
                "the compiled step without a CUDA graph",
            )
            return None
        self.stats.captured += 1
        captured = self._graphs[key] = _Captured(graph, static_x, static_t, static, outputs)
        return captured

    # --- the device side (CPU tests replace these two) ------------------------------------------------
    def _warm_up(self, run: Callable[[], Outputs]) -> None:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self._stream):
                for _ in range(2):
                    run()
        finally:  # also when a run stops it: the cache is put back on this stream, after the warm-up's writes
            torch.cuda.current_stream().wait_stream(self._stream)

    def _record(self, run: Callable[[], Outputs]) -> tuple[Any, Outputs]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        previous = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(
                graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
            ):
                outputs = run()
        finally:
            # torch.cuda.graph leaves its capture stream current when ending the capture raises.
            torch.cuda.set_stream(previous)
        return graph, outputs

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, tensor in saved.items():
            getattr(self.cache, name).copy_(tensor)

    def clear(self) -> None:
        """Drop every captured graph and its memory pool (new modules, a new prompt shape, closing)."""
        self._graphs.clear()
        self._warm.clear()
        self._later.clear()
        self._pool = None
        self._cross = self._cross_source = None
        self._inputs.clear()
