"""CUDA graphs over whole DiT steps: one capture per static call signature, replayed every chunk.

A DiT step launches ~a thousand kernels; replaying a captured graph costs one launch, so the host is
never the bottleneck. What may differ between calls lives in fixed device buffers that the capture
reads: the noisy input and timesteps (copied in), the cache plan (the cache's own staging buffer),
the text K/V (copied in when the prompt changes) and the KV cache itself.

Capturing runs the step twice to warm up (compiling, autotuning), which would advance the cache's
device state; the cache is saved before and restored after, so capturing is invisible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from wanstream.models.dit import CrossKV
from wanstream.models.kv_cache import CallPlan, KVCache

Step = Callable[[torch.Tensor, torch.Tensor, CrossKV, CallPlan], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    outputs: tuple[torch.Tensor, torch.Tensor]


class StepGraphs:
    def __init__(self, cache: KVCache, step: Step) -> None:
        self.cache = cache
        self.step = step
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._cross: CrossKV | None = None  # static copies of the text K/V the graphs read
        self._cross_source: CrossKV | None = None

    @staticmethod
    def eligible(x: torch.Tensor, plan: CallPlan) -> bool:
        return x.is_cuda and plan.mask is None and plan.table.is_cuda

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, cross: CrossKV, plan: CallPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        if captured is None:
            captured = self._graphs[key] = self._capture(x, t, plan)
        captured.x.copy_(x)
        captured.t.copy_(t)
        captured.graph.replay()
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

    def _capture(self, x: torch.Tensor, t: torch.Tensor, plan: CallPlan) -> _Captured:
        assert self._cross is not None
        saved = {name: buf.clone() for name, buf in self.cache.state()["buffers"].items()}
        static_x, static_t = x.clone(), t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(static_x, static_t, self._cross, plan)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.step(static_x, static_t, self._cross, plan)
        self._restore(saved)  # capture does not run kernels, but be explicit about the state
        return _Captured(graph, static_x, static_t, outputs)

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, tensor in saved.items():
            getattr(self.cache, name).copy_(tensor)

    def clear(self) -> None:
        self._graphs.clear()
        self._cross = self._cross_source = None
