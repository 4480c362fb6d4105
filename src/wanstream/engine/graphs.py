"""CUDA graphs over whole DiT steps: one capture per static call signature, replayed every chunk.

A DiT step launches ~a thousand kernels; replaying a captured graph costs one launch, so the host is
never the bottleneck. What may differ between calls lives in fixed device buffers that the capture
reads: the noisy input and timesteps (copied in), the cache plan (the cache's own staging buffer),
the text K/V (copied in when the prompt changes) and the KV cache itself.

A capture is prepared and made safely:
* Warm-up runs the step twice on the very stream that will capture, so compiling, autotuning and every
  first use of a cuBLAS/cuDNN handle, plan or workspace on that stream happen before recording, never inside
  it. Warming up advances the cache's device state: the cache is saved before and restored after (once per
  signature; recording itself runs no kernels).
* Recording waits for other threads' GPU work to stop (`fastpath.GATE`): a compile warming up on another
  thread invalidates a capture. If such work is running, capturing is deferred and this call runs the
  compiled step directly; a later call captures.
* Recording uses CUDA's thread-local capture mode: another thread's allocation (the caching allocator is
  capture-aware) does not invalidate it.
* If capturing fails anyway, that signature runs the compiled step without a graph from then on, with one
  warning naming the cause (counted in `fastpath.FALLBACKS`: `/metrics`, `bench --json`). The output is the
  same; only the launch overhead returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wanstream.models.dit import CrossKV
from wanstream.models.fastpath import FALLBACKS, GATE, is_out_of_memory
from wanstream.models.kv_cache import CallPlan, KVCache

Step = Callable[[torch.Tensor, torch.Tensor, CrossKV, CallPlan], tuple[torch.Tensor, torch.Tensor]]
Outputs = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph (anything with .replay())
    x: torch.Tensor
    t: torch.Tensor
    outputs: Outputs


@dataclass
class GraphStats:
    captured: int = 0  # signatures captured
    replays: int = 0
    deferred: int = 0  # calls run without a graph because another thread was compiling
    failed: int = 0  # signatures whose capture failed (they run without a graph)


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
        self._pool: Any = None
        self._stream: Any = None
        self._cross: CrossKV | None = None  # static copies of the text K/V the graphs read
        self._cross_source: CrossKV | None = None

    def eligible(self, x: torch.Tensor, plan: CallPlan) -> bool:
        return x.device.type == self.device_type and plan.mask is None and plan.table.device == x.device

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cross: CrossKV, plan: CallPlan) -> Outputs:
        self._load_cross(cross)
        key = (
            tuple(x.shape),
            x.dtype,
            plan.frames,
            plan.max_valid,
            plan.sink_check,
            plan.any_full,
            plan.any_append,
            plan.table.data_ptr(),
        )
        captured = self._graphs.get(key)
        if captured is None and key not in self._failed:
            captured = self._try_capture(key, x, t, plan)
        if captured is None:
            return self.step(x, t, self._cross, plan)  # type: ignore[arg-type]
        captured.x.copy_(x)
        captured.t.copy_(t)
        captured.graph.replay()
        self.stats.replays += 1
        x0, flow = captured.outputs
        return x0.clone(), flow.clone()  # the next replay overwrites the static outputs

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

    def _try_capture(self, key: tuple, x: torch.Tensor, t: torch.Tensor, plan: CallPlan) -> _Captured | None:
        assert self._cross is not None
        cross = self._cross
        static_x, static_t = x.clone(), t.clone()
        try:
            if key not in self._warm:
                # Warming up runs the step: save the cache (its K/V are GBs at full size: only here, once per
                # signature, never on a deferred call) and put it back.
                saved = {name: buf.clone() for name, buf in self.cache.state()["buffers"].items()}
                try:
                    self._warm_up(lambda: self.step(static_x, static_t, cross, plan))
                finally:
                    self._restore(saved)
                    del saved
                self._warm.add(key)
            with GATE.capture(self.capture_wait_s) as granted:
                if not granted:
                    self.stats.deferred += 1
                    return None
                # Recording runs no kernels: the cache is untouched, also when it fails.
                graph, outputs = self._record(lambda: self.step(static_x, static_t, cross, plan))
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
                f"DiT step capture (lanes×frames {tuple(x.shape[:2])}, cache {plan.max_valid} tokens)",
                exc,
                "the compiled step without a CUDA graph",
            )
            return None
        self.stats.captured += 1
        captured = self._graphs[key] = _Captured(graph, static_x, static_t, outputs)
        return captured

    # --- the device side (CPU tests replace these two) ------------------------------------------------
    def _warm_up(self, run: Callable[[], Outputs]) -> None:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for _ in range(2):
                run()
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
        self._pool = None
        self._cross = self._cross_source = None
