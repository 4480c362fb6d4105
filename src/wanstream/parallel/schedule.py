"""Rank 0's schedule: which (chunk, step) pairs each ring batch computes, and how the single-process
engine computed each of them.

The single-process stream batch (`engine/denoise/local.py`) runs *calls*: call s puts chunk s in lane 0 and
lane j holds chunk s − j at step j. Its output needs the previous call's output (lanes shift by one), so
one call cannot overlap the next. The ring instead keeps R = ranks batches circulating: rank 0 starts
batch m, rank r runs it at time m + r, and it comes back to rank 0 at time m + R, where its lanes shift
and a new chunk enters. Lane j of batch m therefore holds chunk m − j·R at step j, and every rank works
on a different batch at every moment.

Both orders compute the same pairs with the same inputs:
* (c, j) takes the re-noised x0 of (c, j−1), computed R time steps (one trip) earlier;
* lane j's cache is written by chunks c = 1, 2, … in order at step j, in both orders;
* "warm-up" chunks c ≤ 0 (the single-process engine starts lanes 1..N−1 from zeros at chunk 1's
  position) are pairs (c, j) with c ≥ 1 − j, entering with zeros at step 1 − c.
The ring also meets pairs with c < 1 − j at a stream's start; those are padding lanes that leave no trace.
Per pair, the timestep, seed, prompt version and attention padding are those of its single-process call
c + j, recorded here as the calls happen (a shadow cache planner replays the single-process host
bookkeeping to learn each call's padding). Chunk c comes out at time c + N·R − 1 instead of c + N − 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from wanstream.models.kv_cache import KVCache, KVCacheConfig
from wanstream.parallel.stage import Lane

Source = Literal["noisy", "return", "zeros"]


@dataclass
class Call:
    """What the single-process engine's call s of the stream ran with."""

    timesteps: list[int | torch.Tensor]  # lanes.timesteps (lane 0's may be a device scalar)
    seed: int
    version: int
    starts: list[int]
    valid: list[int]
    masked: bool


@dataclass
class BatchPlan:
    lanes: list[Lane]
    sources: list[Source]  # where each lane's input comes from
    timesteps: list[int | torch.Tensor]


class RingSchedule:
    def __init__(self, ranks: int, steps: list[int], cache: KVCacheConfig) -> None:
        self.R = ranks
        self.steps = list(steps)
        self.N = len(steps)
        # Host bookkeeping only (no layers): what the single-process cache planner decides per call.
        self.shadow = KVCache(replace(cache, num_layers=0, lanes=self.N), total_steps=self.N)
        self.calls: dict[int, Call] = {}
        self.k0 = 0  # global id of the stream's first chunk
        self.after = 0  # token position right after the first chunk (the warm-up lanes' position)
        self.lane_t: list[int | torch.Tensor] = list(steps)
        self.decode: dict[int, bool] = {}  # chunk → decoded when finished (flush chunks are not)

    def retarget(self, steps: list[int]) -> None:
        """Same count, new values: as `Denoiser.retarget` (lane 0 keeps its controlled step)."""
        self.steps = list(steps)
        self.lane_t = [self.lane_t[0], *self.steps[1:]]

    # ----------------------------------------------------------------------------------------------
    def first_chunk(self, chunk: int, start: int, frames: int, seed: int, version: int) -> list[Lane]:
        """The stream's first chunk: every step at batch 1, one trip around the ring per step."""
        self.shadow.reset(total_steps=self.N)
        self.calls.clear()
        self.decode.clear()
        self.k0, self.lane_t = chunk, list(self.steps)
        lanes = []
        for i in range(self.N):
            plan = self.shadow.plan([start], frames)
            renoise = self.steps[i + 1] if i < self.N - 1 else None
            lanes.append(
                Lane(
                    chunk,
                    i,
                    start,
                    version,
                    plan.valid[0],
                    plan.valid[0],
                    False,
                    renoise,
                    seed,
                    True,
                    i == self.N - 1,
                )
            )
        self.shadow.broadcast_lane0()
        self.after = start + frames * self.shadow.config.frame_tokens
        self.calls[0] = Call(list(self.steps), seed, version, [start], [], False)
        return lanes

    def call(
        self,
        chunk: int,
        start: int,
        first_step: int | torch.Tensor | None,
        seed: int,
        version: int,
        decode: bool,
    ) -> int:
        """Record single-process call s (chunk s enters lane 0); returns s."""
        s = chunk - self.k0
        if first_step is not None:
            self.lane_t[0] = first_step
        starts = [start]
        for j in range(1, self.N):
            prev = self.calls.get(s - j)
            starts.append(prev.starts[0] if s - j >= 1 and prev is not None else self.after)
        plan = self.shadow.plan(starts, 1)
        self.calls[s] = Call(
            list(self.lane_t), seed, version, starts, list(plan.valid), plan.mask is not None
        )
        self.decode[chunk] = decode
        for old in [k for k in self.calls if k < s - self.N * self.R - 2]:
            del self.calls[old]
            self.decode.pop(self.k0 + old, None)
        return s

    def batch(self, m: int) -> BatchPlan:
        """Lanes of ring batch m (m ≥ 1: the batch that chunk m enters)."""
        lanes, sources, timesteps = [], [], []
        current = self.calls[m]
        for j in range(self.N):
            c = m - j * self.R
            if c >= 1 - j:  # a pair the single-process engine computes, in its call c + j
                call = self.calls[c + j]
                renoise = int(call.timesteps[j + 1]) if j < self.N - 1 else None
                finished = j == self.N - 1 and c >= 1 and self.decode.get(self.k0 + c, False)
                lanes.append(
                    Lane(
                        self.k0 + c,
                        j,
                        call.starts[j],
                        call.version,
                        max(call.valid),
                        call.valid[j],
                        call.masked,
                        renoise,
                        call.seed,
                        True,
                        finished,
                    )
                )
                sources.append("noisy" if j == 0 else "zeros" if c == 1 - j else "return")
                timesteps.append(call.timesteps[j])
            else:  # padding: keeps the batch at N lanes (same shapes, same numerics); leaves no trace
                lanes.append(
                    Lane(self.k0 + c, j, self.after, current.version, 0, 0, False, None, 0, False, False)
                )
                sources.append("zeros")
                timesteps.append(self.steps[j])
        return BatchPlan(lanes, sources, timesteps)

    @property
    def lag(self) -> int:
        """Flush chunks needed after the last real chunk before it is finished: (N − 1)·R."""
        return (self.N - 1) * self.R
