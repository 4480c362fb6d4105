"""One rank's part of the DiT: a contiguous range of blocks, their KV cache and their text K/V.

The KV cache is per layer, so each rank allocates a `KVCache` over its own layers only; its host
bookkeeping (which slot each lane writes next) depends only on the lanes' positions, so every rank
plans the same lanes the same way. Rank 0 also embeds (patchify, timestep embedding); the last rank
also runs the head and turns the flow into x0.

Exactness. A ring batch holds the same (chunk, step) pairs as the single-process engine, only grouped
differently (see `schedule.py`), so three things are made to match per lane, not per batch:
* the attention padding: in one process a lane attends `max(valid)` keys of the call it ran in, with a
  mask when the lanes' lengths differ; padding changes the float rounding, so every lane carries the
  padded length and mask flag of its single-process call, and attends alone when the batch's differ;
* the text K/V: a lane uses the conditioning of its single-process call; lanes with different prompt
  versions attend stacked per-lane text K/V (identical numbers to the shared, folded form);
* padding lanes: at a stream's start the ring runs a few lanes that the single-process engine never
  computed; their cache lanes are saved before the batch and restored after, so they leave no trace.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import astuple, dataclass

import torch
from torch import nn

from wanstream.engine.settings import StreamSettings
from wanstream.models.attention import attention
from wanstream.models.dit import CrossKV, WanBlock, WanDiT
from wanstream.models.kv_cache import KVCache, KVCacheConfig


@dataclass
class Lane:
    """One lane of a ring batch: which chunk at which step, and how its single-process call ran."""

    chunk: int  # global chunk id (the noise key)
    step: int  # denoising step index (= lane index)
    start: int  # first token position
    version: int  # conditioning version (text K/V)
    attend: int  # keys attended by the single-process call (tokens, padded)
    valid: int  # this lane's own attended length after its write
    masked: bool  # the single-process call used a padding mask
    renoise: int | None  # timestep its x0 is re-noised to for the next step (None: last step)
    seed: int  # noise seed of its single-process call
    live: bool  # False: a padding lane that must leave no trace
    decode: bool  # finished real chunk: the last rank decodes its x0

    def to_json(self) -> list:
        return list(astuple(self))

    @classmethod
    def from_json(cls, row: list) -> Lane:
        return cls(*row)


def cache_config(settings: StreamSettings, num_layers: int, num_heads: int, head_dim: int) -> KVCacheConfig:
    """The single-process session's cache configuration, over `num_layers` layers."""
    s = settings
    return KVCacheConfig(
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        frame_tokens=s.frame_tokens,
        num_frames=s.kv_cache_frames,
        num_sink=s.sink_frames,
        sink_threshold=s.sink_threshold,
        lanes=len(s.denoising_steps),
        eviction=s.eviction,
    )


_LANE_BUFFERS = ("k", "v", "sink_k", "sink_v", "queue", "qhead", "qlen")


class Stage:
    """Blocks [start, stop) of `dit` (other blocks may be absent), with this rank's stream state."""

    def __init__(
        self,
        dit: WanDiT,
        start: int,
        stop: int,
        *,
        first: bool,
        last: bool,
        ranks: int,
        compiled: bool = False,
    ):
        self.dit, self.start, self.stop = dit, start, stop
        self.ranks = ranks
        owned = dit.blocks[start].modulation
        self.device, self.dtype = owned.device, owned.dtype  # fixed even when blocks move
        self.first, self.last = first, last
        self.compiled = compiled  # compile the cache bookkeeping (GPU, optimized components)
        self.cache: KVCache | None = None
        self.settings: StreamSettings | None = None
        # Conditioning versions: the embedded text context (kept for blocks that move here) and the
        # text K/V of this rank's blocks. Lanes in flight refer to the versions of the last N·R + 1
        # single-process calls at most (one new version per call, e.g. during a transition), so keeping
        # a few more than that never drops one still needed.
        self.contexts: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cross: dict[int, CrossKV] = {}
        self.keep_versions = 8 * ranks + 4

    # ----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def configure(self, settings: StreamSettings) -> None:
        """Allocate the cache for a stream of `settings` (the single-process layout over our layers)."""
        cfg = self.dit.config
        cache = KVCache(
            cache_config(settings, self.stop - self.start, cfg.num_heads, cfg.head_dim),
            total_steps=len(settings.denoising_steps),
            dtype=self.dtype,
            device=self.device,
        )
        if self.compiled:
            cache.compile()
        self.cache, self.settings = cache, settings
        self.keep_versions = len(settings.denoising_steps) * self.ranks + 4
        self._forget_old_versions()

    def reset(self) -> None:
        assert self.cache is not None and self.settings is not None
        self.cache.reset(total_steps=len(self.settings.denoising_steps))

    def add_context(self, version: int, context: torch.Tensor) -> None:
        """A new conditioning: the embedded text [1, text_len, dim] (text K/V are made on first use)."""
        self.contexts[version] = context
        self._forget_old_versions()

    def _forget_old_versions(self) -> None:
        while len(self.contexts) > self.keep_versions:
            old, _ = self.contexts.popitem(last=False)
            self._cross.pop(old, None)

    def cross(self, version: int) -> CrossKV:
        if version not in self._cross:
            if version not in self.contexts:
                raise RuntimeError(f"conditioning version {version} never reached this rank")
            ctx = self.contexts[version]
            kv = CrossKV()
            for layer in self.layers:
                k, v = self.dit.blocks[layer].cross_attn.kv(ctx)
                kv.k.append(k)
                kv.v.append(v)
            self._cross[version] = kv
        return self._cross[version]

    def forget_cross(self) -> None:
        """Blocks moved (rebalance): text K/V are rebuilt from the kept contexts on next use."""
        self._cross.clear()

    # ----------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank 0: noisy latents [B, F, C, h, w], timesteps [B, F] → tokens, e [B, F, dim], e0 [B, F, 6, dim]."""
        tokens, _ = self.dit.patchify(x.transpose(1, 2))
        e, e0 = self.dit.embed_time(t)
        return tokens, e, e0

    def grid(self, frames: int) -> tuple[int, int, int]:
        assert self.settings is not None
        p = self.dit.config.patch_size
        return (frames // p[0], self.settings.height // 8 // p[1], self.settings.width // 8 // p[2])

    def blocks(self, h: torch.Tensor, e0: torch.Tensor, lanes: list[Lane], frames: int) -> torch.Tensor:
        """This rank's blocks over a ring batch: h [B, S, dim] → h, writing our layers' caches."""
        cache = self.cache
        assert cache is not None
        saved = self._save_lanes([j for j, lane in enumerate(lanes) if not lane.live])
        plan = cache.plan([lane.start for lane in lanes], frames)
        for j, lane in enumerate(lanes):
            if lane.live and plan.valid[j] != lane.valid:
                raise RuntimeError(
                    f"ring schedule error: lane {j} attends {plan.valid[j]} cached tokens here, "
                    f"{lane.valid} in the single-process engine"
                )
        cos, sin = self.dit.rope.freqs(plan.rope_start, *self.grid(frames))
        attend = self._attention_for(plan, lanes)
        versions = [lane.version for lane in lanes]
        shared = all(v == versions[0] for v in versions)
        crosses = {v: self.cross(v) for v in set(versions)}
        first_half, second_half = self.dit._halves
        for i, layer in enumerate(self.layers):
            block = self.dit.blocks[layer]
            q, k, v = first_half(block, h, e0, cos, sin)
            k_all, v_all = cache.update(i, k, v, plan)
            y = attend(i, q, k_all, v_all)
            if shared:
                ck, cv = crosses[versions[0]].k[i], crosses[versions[0]].v[i]
            else:  # lanes from calls with different prompts: per-lane text K/V
                ck = torch.cat([crosses[ver].k[i] for ver in versions])
                cv = torch.cat([crosses[ver].v[i] for ver in versions])
            h = second_half(block, h, y, e0, ck, cv)
        self._restore_lanes(saved)
        return h

    def _attention_for(self, plan, lanes: list[Lane]):
        """Self-attention as each lane's single-process call computed it (see the module docstring)."""
        live = [lane for lane in lanes if lane.live]
        batched = all(
            lane.attend == plan.max_valid and lane.masked == (plan.mask is not None) for lane in live
        ) and len(live) == len(lanes)
        if batched:
            return lambda i, q, k_all, v_all: attention(q.transpose(1, 2), k_all, v_all, plan.mask)
        cache = self.cache
        assert cache is not None
        masks = [
            (torch.arange(lane.attend, device=self.device) < lane.valid).view(1, 1, 1, -1)
            if lane.masked
            else None
            for lane in lanes
        ]

        def per_lane(i: int, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
            qt = q.transpose(1, 2)
            out = torch.zeros_like(qt)  # padding lanes: any finite value (their results are dropped)
            for j, lane in enumerate(lanes):
                if not lane.live:
                    continue
                kc = cache.k[i, j : j + 1, : lane.attend].transpose(1, 2)
                vc = cache.v[i, j : j + 1, : lane.attend].transpose(1, 2)
                out[j : j + 1] = attention(qt[j : j + 1], kc, vc, masks[j])
            return out

        return per_lane

    def _save_lanes(self, lanes: list[int]) -> list[tuple[int, dict, object, int]]:
        cache = self.cache
        assert cache is not None
        saved = []
        for j in lanes:
            buffers = {name: getattr(cache, name)[:, j].clone() for name in _LANE_BUFFERS}
            host = cache.host
            written = host.frames_written[j] if j < len(host.frames_written) else 0
            saved.append((j, buffers, copy.deepcopy(host.lanes[j]), written))
        return saved

    def _restore_lanes(self, saved: list[tuple[int, dict, object, int]]) -> None:
        cache = self.cache
        assert cache is not None
        for j, buffers, lane_state, written in saved:
            for name, value in buffers.items():
                getattr(cache, name)[:, j].copy_(value)
            cache.host.lanes[j] = lane_state  # type: ignore[assignment]
            if j < len(cache.host.frames_written):
                cache.host.frames_written[j] = written

    def head(self, h: torch.Tensor, e: torch.Tensor, frames: int) -> torch.Tensor:
        """Last rank: hidden states → flow [B, F, C, h, w]."""
        out = self.dit.head(h, e)
        return self.dit.unpatchify(out, self.grid(frames)).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# Keeping only some blocks
# ------------------------------------------------------------------------------------------------
def keep_blocks(dit: WanDiT, start: int, stop: int, *, first: bool, last: bool) -> WanDiT:
    """Free the parts of `dit` this rank never runs: other blocks, and the embeddings (not rank 0) or
    the head (not the last rank). Indices stay: `dit.blocks[i]` is block i or a placeholder."""
    for i in range(len(dit.blocks)):
        if not start <= i < stop:
            dit.blocks[i] = Absent(i)
    if not first:
        for name in ("patch_embedding", "text_embedding", "time_embedding", "time_projection"):
            setattr(dit, name, Absent(name))
    if not last:
        dit.head = Absent("head")  # type: ignore[assignment]
    return dit


class Absent(nn.Module):
    """A part of the DiT that lives on another rank."""

    def __init__(self, what: int | str) -> None:
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"DiT part {self.what!r} is not on this rank")


def new_block(dit: WanDiT, device: torch.device, dtype: torch.dtype) -> WanBlock:
    """An empty block to receive weights into (the rebalancer moves blocks between ranks)."""
    with torch.device("meta"):
        block = WanBlock(dit.config)
    return block.to(dtype).to_empty(device=device).eval().requires_grad_(False)
