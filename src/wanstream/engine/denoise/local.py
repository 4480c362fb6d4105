"""Few-step denoising of one chunk at a time over the DiT and its KV cache, in two batching modes.

* **No batch** (`"none"`): each chunk runs its N steps as N sequential batch-1 forwards; the chunk's
  result is ready at once (lowest latency).
* **Stream batch** (`"stream"`): the N steps of N consecutive chunks run as N *lanes* of one batched
  forward. Lane i holds the chunk that entered i calls ago and is denoised at step i; after the call
  lanes 0..N−2 are re-noised to the next step and lane N−1 is finished. Output lags N−1 chunks
  (highest throughput). Each lane has its own KV cache.

Both reproduce StreamDiffusionV2 exactly (golden cases `causal_stream_*`, `stream_v2v_*`), including
its chunk-0 `prepare` (all steps sequentially at batch 1 over a 2-latent first chunk, then the cache is
copied to every lane) and its warm-up (lanes 1..N−1 start as zeros at chunk 1's position).

Random draws, keyed for `NoiseSource`: draw 0 of chunk c is its SDEdit input noise (drawn by the
session); draw 1+i is the re-noise after step i of chunk c.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from wanstream.engine.components import Components
from wanstream.engine.denoise.base import Finished
from wanstream.engine.errors import SessionError
from wanstream.engine.graphs import StepGraphs
from wanstream.engine.rng import NoiseSource
from wanstream.engine.settings import Batching, CacheContext, StreamSettings, clean_cache_problem
from wanstream.models.dit import CrossKV, StreamExtension, WanDiT
from wanstream.models.kv_cache import CallPlan, KVCache, KVCacheConfig
from wanstream.models.scheduler import FlowMatchScheduler


@dataclass
class DiTCall:
    """One DiT forward, as the event log and the conformance runner see it."""

    timesteps: list[int]  # per lane
    starts: list[int]  # per lane, token positions
    frames: int
    x: torch.Tensor  # the noisy input [B, F, C, h, w]
    flow: torch.Tensor  # the DiT's flow prediction [B, F, C, h, w]
    x0: torch.Tensor  # the x0 prediction [B, F, C, h, w]


@dataclass
class _Lanes:
    """Stream-batch state: what each lane holds between calls."""

    hidden: torch.Tensor  # [N, 1, C, h, w]
    starts: list[int]
    chunks: list[int]  # which chunk each lane holds (for noise keys; < 0 during warm-up)
    timesteps: list[int | torch.Tensor]  # lane i runs at timesteps[i]; lane 0's is the controlled first step
    processed: int = 0


class DeviceSteps:
    """Per-lane timesteps as a device int64 tensor, built without a host→device copy per call.

    The step list (and 0) is uploaded once per list and sliced from there; controlled first steps already are
    device scalars. Shared by the single-process `Denoiser` and the multi-GPU ring.
    """

    def __init__(self) -> None:
        self._known: dict[int, int] = {}
        self._tensor: torch.Tensor | None = None

    def __call__(
        self, values: Sequence[int | torch.Tensor], steps: Sequence[int], device: torch.device
    ) -> torch.Tensor:
        listed = [*steps, 0]
        if self._tensor is None or self._tensor.device != device or list(self._known) != listed:
            self._known = {int(t): i for i, t in enumerate(listed)}
            self._tensor = torch.tensor(listed, dtype=torch.long).to(device)
        parts = []
        for v in values:
            if isinstance(v, torch.Tensor):
                parts.append(v.reshape(1).to(device=device, dtype=torch.long))
            elif v in self._known:
                i = self._known[v]
                parts.append(self._tensor[i : i + 1])
            else:  # a value set by hand that is not in the list (rare): one small upload
                parts.append(torch.tensor([v], dtype=torch.long).to(device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class Denoiser:
    dit: WanDiT
    scheduler: FlowMatchScheduler
    cache: KVCache
    rng: NoiseSource
    steps: list[int]
    batching: Batching = "none"
    cache_context: CacheContext = "last_step"
    on_call: list = field(default_factory=list)  # callbacks(DiTCall) for tracing; empty in production
    _lanes: _Lanes | None = None
    _first_step: int | torch.Tensor | None = None  # no batch: the controlled first step persists
    _timesteps: DeviceSteps = field(default_factory=DeviceSteps)
    graphs: StepGraphs | None = None
    _stream_start: bool = False  # inside first_chunk: its steps are not captured (engine/graphs.py)

    def __post_init__(self) -> None:
        self.validate(self.steps, self.batching, self.cache_context, self.cache.config.lanes)

    @staticmethod
    def validate(steps: Sequence[int], batching: Batching, cache_context: CacheContext, lanes: int) -> None:
        if not steps:
            raise ValueError("the denoising step list is empty")
        if batching == "stream" and lanes < len(steps):
            raise ValueError(
                f"stream batch needs one cache lane per step ({len(steps)}), the cache has {lanes}"
            )
        if problem := clean_cache_problem(batching, cache_context):
            raise ValueError(problem)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def passes_per_chunk(self) -> int:
        return self.num_steps + (self.cache_context == "clean")

    def reset(self, steps: Sequence[int] | None = None) -> None:
        """Forget the stream: empty the cache and the lanes (a new session, or a hard cut)."""
        if steps is not None:
            self.validate(steps, self.batching, self.cache_context, self.cache.config.lanes)
            self.steps = list(steps)
        self.cache.reset(total_steps=self.passes_per_chunk)
        self._lanes = None
        self._first_step = None

    # ----------------------------------------------------------------------------------------------

    def _forward(
        self,
        x: torch.Tensor,
        timesteps: Sequence[int | torch.Tensor],
        starts: list[int],
        cross: CrossKV,
        extension: StreamExtension | None = None,
    ) -> torch.Tensor:
        """One DiT call: x [B, F, C, h, w] at per-lane timesteps and start tokens → x0 (same shape)."""
        B, F = x.shape[:2]
        plan = self.cache.plan(starts, F)
        t = self._timesteps(timesteps, self.steps, x.device)[:, None].expand(B, F).contiguous()
        if self.graphs is not None and self.graphs.eligible(x, plan, extension):
            x0, flow = self.graphs(x, t, cross, plan, extension, capture=not self._stream_start)
        else:
            x0, flow = self._step(x, t, cross, plan, extension)
        if self.on_call:
            call = DiTCall([int(v) for v in t[:, 0].tolist()], list(starts), F, x, flow, x0)
            for callback in self.on_call:
                callback(call)
        return x0

    def _step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross: CrossKV,
        plan: CallPlan,
        extension: StreamExtension | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work of one call (what a CUDA graph captures): DiT forward, then flow → x0."""
        flow = self.dit.forward_stream(x, t, cross, self.cache, plan, extension)
        x0 = self.scheduler.flow_to_x0(flow.flatten(0, 1), x.flatten(0, 1), t.flatten(0, 1)).unflatten(
            0, x.shape[:2]
        )
        return x0, flow

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay captured CUDA graphs for steady-state calls (CUDA only; warm-up calls stay eager)."""
        self.graphs = StepGraphs(self.cache, self._step) if enabled else None

    def _denoise_sequential(
        self,
        noisy: torch.Tensor,
        steps: Sequence[int | torch.Tensor],
        start: int,
        cross: CrossKV,
        chunk: int,
        extension: StreamExtension | None = None,
    ) -> torch.Tensor:
        """All steps of one chunk at batch 1, re-noising between steps."""
        F = noisy.shape[1]
        x = noisy
        for i, t in enumerate(steps):
            x0 = self._forward(x, [t], [start], cross, extension)
            if i < len(steps) - 1:
                eps = self.rng.randn(
                    x0.flatten(0, 1).shape, chunk=chunk, draw=1 + i, device=x0.device, dtype=x0.dtype
                )
                x = self.scheduler.add_noise(x0.flatten(0, 1), eps, float(steps[i + 1])).unflatten(0, (1, F))
        if self.cache_context == "clean":
            # Scope / Self-Forcing: rewrite this chunk's cache entries from the clean output at t = 0
            # (Scope runs this pass without VACE hints: the extension decides what it keeps).
            self._forward(x0, [0], [start], cross, extension.clean_pass() if extension is not None else None)
        return x0

    # ----------------------------------------------------------------------------------------------
    def first_chunk(
        self,
        noisy: torch.Tensor,
        start: int,
        cross: CrossKV,
        chunk: int = 0,
        extension: StreamExtension | None = None,
    ) -> list[Finished]:
        """The reference's `prepare`: every step on the (2-latent) first chunk at batch 1 → its x0."""
        self._stream_start = True
        try:
            x0 = self._denoise_sequential(noisy, self.steps, start, cross, chunk, extension)
        finally:
            self._stream_start = False
        if self.batching == "stream":
            N = self.num_steps
            self.cache.broadcast_lane0()
            after = start + noisy.shape[1] * self.cache.config.frame_tokens
            self._lanes = _Lanes(
                hidden=torch.zeros((N, 1, *noisy.shape[2:]), dtype=noisy.dtype, device=noisy.device),
                starts=[after] * N,
                chunks=[chunk - i for i in range(N)],
                timesteps=list(self.steps),
            )
        return [Finished(chunk, x0=x0)]

    def chunk(
        self,
        noisy: torch.Tensor,
        start: int,
        first_step: int | torch.Tensor | None,
        cross: CrossKV,
        chunk: int,
        extension: StreamExtension | None = None,
        decode: bool = True,
    ) -> list[Finished]:
        """Denoise one later chunk (noisy [1, 1, C, h, w]) whose first step is `first_step`.

        Returns the finished x0 [1, 1, C, h, w] — of this chunk (no batch), or of the chunk that entered
        N−1 calls ago (stream batch; none while the lanes warm up). `first_step=None` keeps the last one.
        Every chunk's x0 comes back, `decode` or not (one process has no transfer to save).
        """
        if self.batching == "none":
            if first_step is not None:
                self._first_step = first_step
            first = self._first_step if self._first_step is not None else self.steps[0]
            x0 = self._denoise_sequential(noisy, [first, *self.steps[1:]], start, cross, chunk, extension)
            return [Finished(chunk, x0=x0)]
        lanes = self._lanes
        if lanes is None:
            raise RuntimeError("stream batch: the first chunk has not been denoised yet")
        N = self.num_steps
        lanes.hidden = torch.cat([noisy, lanes.hidden[:-1]])
        lanes.starts = [start, *lanes.starts[:-1]]
        lanes.chunks = [chunk, *lanes.chunks[:-1]]
        if first_step is not None:
            lanes.timesteps[0] = first_step
        x0 = self._forward(lanes.hidden, lanes.timesteps, lanes.starts, cross, extension)
        hidden = x0.clone()
        for i in range(N - 1):
            eps = self.rng.randn(
                x0[i : i + 1].shape, chunk=lanes.chunks[i], draw=1 + i, device=x0.device, dtype=x0.dtype
            )
            hidden[i : i + 1] = self.scheduler.add_noise(x0[i : i + 1], eps, float(lanes.timesteps[i + 1]))
        lanes.hidden = hidden
        lanes.processed += 1
        return [Finished(lanes.chunks[N - 1], x0=x0[N - 1 :])] if lanes.processed >= N else []

    def wait(self) -> Finished:
        raise RuntimeError("one process has nothing in flight beyond its lanes: flush chunks push it out")

    def retarget(self, steps: Sequence[int]) -> None:
        """New step values, same count: lanes keep their chunks and move to the new timesteps."""
        if len(steps) != self.num_steps:
            raise ValueError("retarget keeps the number of steps; a different count needs reset()")
        self.steps = list(steps)
        if self._lanes is not None:
            self._lanes.timesteps = [self._lanes.timesteps[0], *self.steps[1:]]

    def state(self) -> dict[str, Any]:
        """The KV cache, the lane contents and the persistent first step."""
        return {
            "cache": self.cache.state(),
            "steps": list(self.steps),
            "lanes": self._lanes,
            "first_step": self._first_step,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.cache.load_state(state["cache"])
        self.steps = list(state["steps"])
        self._lanes = state["lanes"]
        self._first_step = state["first_step"]

    def timing(self, name: str) -> AbstractContextManager[Any]:
        return nullcontext()

    def weights_changed(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()  # captured graphs read the replaced modules' tensors

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        self.graphs = None
        self.cache = None  # type: ignore[assignment]
        self._lanes = None

    @property
    def lag(self) -> int:
        """Chunks between a chunk's input and its output."""
        return self.num_steps - 1 if self.batching == "stream" else 0

    @property
    def pending(self) -> int:
        """Chunks inside the lanes that still need flush calls to come out."""
        if self.batching != "stream" or self._lanes is None:
            return 0
        return min(self._lanes.processed, self.num_steps - 1)


def cache_config(components: Components, settings: StreamSettings) -> KVCacheConfig:
    """The KV cache a stream of `settings` allocates on these networks (one lane per step in stream batch)."""
    cfg = components.dit.config
    return KVCacheConfig(
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        frame_tokens=settings.frame_tokens,
        num_frames=settings.kv_cache_frames,
        num_sink=settings.sink_frames,
        sink_threshold=settings.sink_threshold,
        lanes=len(settings.denoising_steps) if settings.batching == "stream" else 1,
        eviction=settings.eviction,
    )


class LocalBackend:
    """Every chunk denoised in this process, on the session's own KV cache."""

    conditioner_problem: str | None = None

    def __init__(self, components: Components) -> None:
        self.components = components
        self._cross: CrossKV | None = None
        self._cross_version = -1

    def problem(self, settings: StreamSettings) -> str | None:
        return None  # the settings model already refuses what one process cannot run

    def build(self, settings: StreamSettings, rng: NoiseSource, previous: Denoiser | None) -> Denoiser:
        c, s = self.components, settings
        cache_cfg = cache_config(c, s)
        try:
            cache = KVCache(cache_cfg, dtype=c.dtype, device=c.device)
        except torch.OutOfMemoryError as exc:
            raise SessionError(
                f"not enough GPU memory for a {s.height}x{s.width} cache of {s.kv_cache_frames} frames × "
                f"{cache_cfg.lanes} lane(s); try fewer steps, batching 'none' or a smaller size ({exc})"
            ) from exc
        if c.optimized:
            cache.compile()
        denoiser = Denoiser(
            c.dit, c.scheduler, cache, rng, list(s.denoising_steps), s.batching, s.cache_context
        )
        if c.optimized and c.device.type == "cuda":
            denoiser.use_cuda_graphs()
        return denoiser

    def condition(self, denoiser: Denoiser, embedding: torch.Tensor, version: int) -> CrossKV:
        """The text K/V of every block, computed once per prompt version (and again after LoRAs change)."""
        if self._cross is None or self._cross_version != version:
            self._cross = self.components.dit.cross_kv(embedding)
            self._cross_version = version
        return self._cross

    def forget_conditioning(self) -> None:
        self._cross = None
