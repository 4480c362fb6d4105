"""StreamDiffusionV2's rolling self-attention KV cache, preallocated, batched over lanes.

Layout: one buffer per layer of shape [lanes, num_frames * L, heads, head_dim] for keys (stored after
RoPE, never re-rotated) and one for values, token-major so a chunk's write is one contiguous block; L is the number of tokens in one latent frame. A *slot* is
one latent frame of tokens. A *lane* is one independent stream of the batched forward: one lane per
denoising step in stream batch, a single lane otherwise.

Two eviction policies:

* ``"sdv2"`` — the authors' ring buffer, reproduced exactly (golden cases `causal_stream_*`). Each layer
  and lane owns a queue of slot end offsets: the next write into a full cache goes to the slot at the
  queue's head. The adaptive sink pushes a sink slot to the *front* of that queue when the new frame's
  mean K/V is too dissimilar from it. Because those pushes depend on the data, the queues live on the
  device and every decision is made there: no host sync in the forward. Everything that depends only
  on positions (is the lane full, does it pop, what is appended) is decided on the host, once per call,
  in `plan()`.
* ``"fifo"`` — the Scope / Self-Forcing cache: the first `num_sink` frames stay, later frames rotate
  through the remaining slots oldest-first, and every pass over a chunk rewrites that chunk's slot.

Reference quirks reproduced in ``"sdv2"`` mode (see the golden notes; each is marked QUIRK below):
  1. The eviction queue is only filled while the cache fills, with `end + n` ("look one chunk ahead").
     With a 2-frame first chunk, slots 0-2 are never evicted by the ring whatever `num_sink` is.
  2. No-batch `current_step` countdown: it counts only full-branch calls, so the chunk that fills the
     cache writes step 1 through the filling branch and steps 2..N into the queue head (another slot).
  3. The adaptive sink compares against all-zero (never written) sink slots, whose cosine is 0, so it
     fires at the first streamed chunk with 3 sinks.
  4. Sink pushes pile up at the queue front; one is consumed per pop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wanstream.models.fastpath import CompiledOrEager

Eviction = Literal["sdv2", "fifo"]


@dataclass(frozen=True)
class KVCacheConfig:
    num_layers: int
    num_heads: int
    head_dim: int
    frame_tokens: int  # L: tokens per latent frame, (H/16)*(W/16)
    num_frames: int = 6  # `num_kv_cache`: latent frames the cache holds
    num_sink: int = 3  # `num_sink_tokens` (in frames, despite the reference's name)
    sink_threshold: float = 0.2  # adaptive sink: cosine below this refreshes a sink; -1 disables
    lanes: int = 1
    eviction: Eviction = "sdv2"
    # Device queue capacity. The reference's Python list is unbounded; ours is fixed so memory stays
    # flat. It only fills if the adaptive sink fires at nearly every step for ~hundreds of chunks; a
    # push into a full queue is then dropped.
    queue_capacity: int = 256

    def __post_init__(self) -> None:
        if self.eviction == "sdv2" and self.num_frames <= 3:
            # The reference crashes here (IndexError at the first eviction): nothing is ever queued.
            raise ValueError(
                f"num_kv_cache={self.num_frames} is too small: the ring-buffer cache needs at least 4 "
                "latent frames (2 for the first chunk, 1 streamed, 1 to rotate)"
            )
        if not 0 <= self.num_sink < self.num_frames:
            raise ValueError(f"num_sink={self.num_sink} must be in [0, num_kv_cache={self.num_frames})")

    @property
    def capacity(self) -> int:
        """C: tokens the cache holds."""
        return self.num_frames * self.frame_tokens

    def nbytes(self, element_size: int) -> int:
        """Device memory of the K/V buffers (and sink means) in a dtype of `element_size` bytes."""
        per_lane_layer = 2 * (self.capacity + self.num_sink + 1) * self.num_heads * self.head_dim
        return self.num_layers * self.lanes * per_lane_layer * element_size

    @property
    def adaptive_sink(self) -> bool:
        return self.eviction == "sdv2" and self.num_sink > 0 and self.sink_threshold > -1


# Columns of the per-call plan tensor (int64 [lanes, _NCOLS + frames]).
_FULL, _POP, _APPEND, _APPEND_VALUE, _ROPE_START, _NCOLS = range(6)


@dataclass
class CallPlan:
    """Everything one forward needs to know about the cache, decided on the host before it runs."""

    lanes: int  # B: lanes in this call (lanes [0, B) of the cache)
    frames: int  # latent frames per lane in this call
    tokens: int  # n = frames * L
    valid: list[int]  # attended cache length per lane after this call's write
    sink_check: bool
    any_full: bool
    any_append: bool
    table: torch.Tensor  # device int64 [B, _NCOLS + frames]; see the column constants
    mask: torch.Tensor | None  # [B, 1, 1, max(valid)] when lanes attend different lengths

    @property
    def max_valid(self) -> int:
        return max(self.valid)

    @property
    def rope_start(self) -> torch.Tensor:
        return self.table[:, _ROPE_START]


@dataclass
class _LaneState:
    """Host bookkeeping of one lane (identical in every layer, so kept once)."""

    global_end: int = 0
    local_end: int = 0
    last_appended: int | None = None  # tail of the queue's appended part (for the dedupe test)
    last_start: int | None = None  # fifo: start of the chunk last written, and its slots
    last_slots: list[int] = field(default_factory=list)


@dataclass
class _HostState:
    lanes: list[_LaneState] = field(default_factory=list)
    current_step: int = 0
    total_steps: int = 1
    frames_written: list[int] = field(default_factory=list)  # fifo: frames since reset, per lane


class KVCache(nn.Module):
    """Preallocated per-layer K/V buffers plus the ring bookkeeping (see the module docstring)."""

    def __init__(
        self,
        config: KVCacheConfig,
        *,
        total_steps: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        c = config
        # Token-major: a chunk's keys are one contiguous block per lane; attention reads the transpose.
        shape = (c.num_layers, c.lanes, c.capacity, c.num_heads, c.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        qshape = (c.num_layers, c.lanes, c.queue_capacity)
        self.register_buffer("queue", torch.zeros(qshape, dtype=torch.long, device=device), persistent=False)
        self.register_buffer(
            "qhead", torch.zeros(qshape[:2], dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer(
            "qlen", torch.zeros(qshape[:2], dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer("_lane_index", torch.arange(c.lanes, device=device), persistent=False)
        # Mean key/value of each sink slot (+ a spare row that absorbs writes to non-sink slots).
        sinks = (c.num_layers, c.lanes, c.num_sink + 1, c.num_heads * c.head_dim)
        self.register_buffer("sink_k", torch.zeros(sinks, dtype=dtype, device=device), persistent=False)
        self.register_buffer("sink_v", torch.zeros(sinks, dtype=dtype, device=device), persistent=False)
        self.register_buffer("_frame_offsets", torch.arange(c.frame_tokens, device=device), persistent=False)
        self.host = _HostState()
        self._staging: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._track = track  # `compile()` swaps in a compiled version
        self._staged_event: torch.cuda.Event | None = None
        # Set to a list to record every adaptive-sink evaluation (layer, similarities, fired); tests only.
        self.sink_log: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
        self.reset(total_steps)

    # ----------------------------------------------------------------------------------------------
    # Session-level operations
    # ----------------------------------------------------------------------------------------------
    def reset(self, total_steps: int | None = None) -> None:
        """Empty the cache for a new session (also resets the eviction queues, unlike the reference)."""
        self.k.zero_()
        self.v.zero_()
        self.sink_k.zero_()
        self.sink_v.zero_()
        self.queue.zero_()
        self.qhead.zero_()
        self.qlen.zero_()
        if total_steps is not None:
            self.host.total_steps = total_steps
        self.host.current_step = self.host.total_steps
        self.host.lanes = [_LaneState() for _ in range(self.config.lanes)]
        self.host.frames_written = [0] * self.config.lanes

    def broadcast_lane0(self) -> None:
        """Copy lane 0 (cache, queues, bookkeeping) to every lane: the switch to stream batch."""
        self.k[:, 1:] = self.k[:, :1]
        self.v[:, 1:] = self.v[:, :1]
        self.sink_k[:, 1:] = self.sink_k[:, :1]
        self.sink_v[:, 1:] = self.sink_v[:, :1]
        self.queue[:, 1:] = self.queue[:, :1]
        self.qhead[:, 1:] = self.qhead[:, :1]
        self.qlen[:, 1:] = self.qlen[:, :1]
        lane0 = self.host.lanes[0]
        self.host.lanes = [
            _LaneState(
                lane0.global_end,
                lane0.local_end,
                lane0.last_appended,
                lane0.last_start,
                list(lane0.last_slots),
            )
            for _ in range(self.config.lanes)
        ]
        self.host.frames_written = [self.host.frames_written[0]] * self.config.lanes

    # ----------------------------------------------------------------------------------------------
    # Per-call planning (host only)
    # ----------------------------------------------------------------------------------------------
    def plan(self, starts: list[int], frames: int) -> CallPlan:
        """Advance the host bookkeeping for one forward over lanes [0, len(starts)).

        `starts[b]` is lane b's first token position (RoPE frame = start // L); each lane writes
        `frames` latent frames.
        """
        c = self.config
        L, C = c.frame_tokens, c.capacity
        B, n = len(starts), frames * c.frame_tokens
        if B > c.lanes:
            raise ValueError(f"call has {B} lanes but the cache was built for {c.lanes}")
        if n > C:
            raise ValueError(f"a chunk of {frames} latent frames does not fit a {c.num_frames}-frame cache")
        if any(s % L for s in starts):
            raise ValueError(f"chunk starts {starts} are not whole latent frames of {L} tokens")
        rows, valid = [], []
        any_full = any_append = False
        sink_tokens = c.num_sink * L
        for b, start in enumerate(starts):
            lane = self.host.lanes[b]
            end = start + n
            row = [0] * (_NCOLS + frames)
            row[_ROPE_START] = start // L
            if c.eviction == "fifo":
                # Every pass over the same chunk rewrites its slots; a new chunk takes the next ones.
                if start != lane.last_start:
                    first = self.host.frames_written[b]
                    lane.last_slots = [self._fifo_slot(first + f) for f in range(frames)]
                    lane.last_start = start
                    self.host.frames_written[b] = first + frames
                row[_NCOLS:] = lane.last_slots
                valid.append(min(self.host.frames_written[b], c.num_frames) * L)
                lane.global_end = end
            elif end > C or lane.local_end >= C:
                any_full = True
                row[_FULL] = 1
                # QUIRK 2: at batch 1 the first N-1 full-branch calls of a chunk keep the queue head.
                if B == 1 and self.host.current_step > 1:
                    self.host.current_step -= 1
                else:
                    row[_POP] = 1
                    self.host.current_step = self.host.total_steps
                lane.local_end = C
                lane.global_end = end
                valid.append(C)
            else:
                local_end = lane.local_end + end - lane.global_end
                # QUIRK 1: queue the slot one chunk ahead while filling.
                rolling_end = end + n
                if sink_tokens < rolling_end <= C and lane.last_appended != rolling_end:
                    row[_APPEND], row[_APPEND_VALUE] = 1, rolling_end
                    lane.last_appended = rolling_end
                    any_append = True
                first_slot = (local_end - n) // L
                row[_NCOLS:] = list(range(first_slot, first_slot + frames))
                lane.local_end = local_end
                lane.global_end = end
                valid.append(local_end)
            rows.append(row)
        table = self._upload(rows)
        device = self.k.device
        mask = None
        if len(set(valid)) > 1:
            mask = (torch.arange(max(valid)) < torch.tensor(valid)[:, None]).view(B, 1, 1, -1).to(device)
        return CallPlan(
            lanes=B,
            frames=frames,
            tokens=n,
            valid=valid,
            sink_check=c.adaptive_sink and n <= L,
            any_full=any_full,
            any_append=any_append,
            table=table,
            mask=mask,
        )

    def _upload(self, rows: list[list[int]]) -> torch.Tensor:
        """The plan table on the device, through a pinned staging buffer (a pageable copy would sync).

        Always the same device buffer (views of it), so a captured CUDA graph reads each call's plan.
        """
        B, cols = len(rows), len(rows[0])
        host = torch.tensor(rows, dtype=torch.long)
        key = (B, cols)
        if self.k.device.type != "cuda":  # the same buffer on every device: a captured step reads it
            table = self._staging.setdefault(key, (host, host.clone()))[1]
            return table.copy_(host)
        if key not in self._staging:
            self._staging[key] = (torch.empty(B, cols, dtype=torch.long).pin_memory(), host.to(self.k.device))
        pinned, device = self._staging[key]
        # The previous call's copy out of `pinned` must be done before we overwrite it.
        if self._staged_event is not None:
            self._staged_event.synchronize()
        pinned.copy_(host)
        device.copy_(pinned, non_blocking=True)
        self._staged_event = torch.cuda.Event()
        self._staged_event.record()
        return device

    def _fifo_slot(self, frame: int) -> int:
        c = self.config
        if frame < c.num_sink:
            return frame
        ring = c.num_frames - c.num_sink
        return c.num_sink + (frame - c.num_sink) % ring

    # ----------------------------------------------------------------------------------------------
    # Per-layer update (device only)
    # ----------------------------------------------------------------------------------------------
    def update(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, plan: CallPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's roped keys and values ([B, n, H, D]) and return the K/V to attend.

        Returned tensors are views [B, H, max_valid, D] into the cache (transposed, not copied);
        `plan.mask` masks per-lane lengths when they differ.
        """
        c, B, L = self.config, plan.lanes, self.config.frame_tokens
        kc, vc = self.k[layer], self.v[layer]
        k_new, v_new = k_new.to(kc.dtype), v_new.to(vc.dtype)
        means = None
        if c.adaptive_sink:
            # Per-frame means of the new keys/values: compared with the sinks now, and they become a
            # sink's cached mean if this write lands in a sink slot (so sinks are never re-read).
            means = tuple(t.unflatten(1, (plan.frames, L)).mean(2).flatten(2) for t in (k_new, v_new))
        slots, sim, fired = self._track(
            plan.table,
            means,
            self.sink_k[layer, :B],
            self.sink_v[layer, :B],
            self.queue[layer, :B],
            self.qhead[layer, :B],
            self.qlen[layer, :B],
            num_sink=c.num_sink,
            frame_tokens=L,
            frames=plan.frames,
            threshold=c.sink_threshold,
            sink_check=plan.sink_check,
            any_full=plan.any_full,
            any_append=plan.any_append,
        )
        if self.sink_log is not None and sim is not None:
            self.sink_log.append((layer, sim.detach().clone(), fired.detach().clone()))
        pos = (slots[:, :, None] * L + self._frame_offsets).reshape(B, plan.tokens)
        for b in range(B):  # whole token rows (heads × head_dim) per lane; B is the lane count (≤ 8)
            kc[b].index_copy_(0, pos[b], k_new[b])
            vc[b].index_copy_(0, pos[b], v_new[b])
        n = plan.max_valid
        return kc[:B, :n].transpose(1, 2), vc[:B, :n].transpose(1, 2)

    def compile(self) -> KVCache:
        """Fuse the per-layer bookkeeping (sink check, queue pops and pushes) into a few kernels instead of
        dozens of tiny ones. One compile serves every layer (the layer's views are arguments). `track` writes
        only its arguments, so a new shape mid-stream compiles on a helper thread, over copies of them, while
        the stream runs the eager bookkeeping (`fastpath.COMPILES`).

        The compiled code takes every branch under its lane masks (`track_every_branch`) and never sees the
        call's `any_full` / `any_append`: those turn when the cache first fills, mid-stream, and a compile
        specialised on them compiled again then, in line on the stream's thread (seconds from a cold cache).
        Like the DiT's halves, it has one graph for every lane count from 2 up."""
        fused = torch.compile(track_every_branch, dynamic=None)

        def compiled(*args: Any, any_full: bool, any_append: bool, **kwargs: Any) -> Any:
            return fused(*args, **kwargs)

        # Every argument but the plain values has the lanes first: one graph for 2 lanes and more.
        self._track = CompiledOrEager(
            compiled, track, "KV-cache bookkeeping", background=True, lane_args=tuple(range(7))
        )
        return self

    def state(self) -> dict[str, object]:
        """Everything needed to resume this cache later (tensors are copied by the caller if needed)."""
        return {
            "buffers": {
                n: getattr(self, n) for n in ("k", "v", "sink_k", "sink_v", "queue", "qhead", "qlen")
            },
            "host": self.host,
        }

    def load_state(self, state: dict[str, object]) -> None:
        for name, tensor in state["buffers"].items():  # type: ignore[union-attr]
            getattr(self, name).copy_(tensor)
        self.host = state["host"]  # type: ignore[assignment]

    # ----------------------------------------------------------------------------------------------
    # Introspection (tests, debugging; syncs with the device)
    # ----------------------------------------------------------------------------------------------
    def queue_contents(self, layer: int, lane: int) -> list[int]:
        head, n = int(self.qhead[layer, lane]), int(self.qlen[layer, lane])
        Q = self.config.queue_capacity
        return [int(self.queue[layer, lane, (head + i) % Q]) for i in range(n)]

    def bookkeeping(self, lane: int) -> dict[str, int]:
        s = self.host.lanes[lane]
        return {"global_end_index": s.global_end, "local_end_index": s.local_end}


def track(
    table: torch.Tensor,
    means: tuple[torch.Tensor, torch.Tensor] | None,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    queue: torch.Tensor,
    qhead: torch.Tensor,
    qlen: torch.Tensor,
    *,
    num_sink: int,
    frame_tokens: int,
    frames: int,
    threshold: float,
    sink_check: bool,
    any_full: bool,
    any_append: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One layer's ring bookkeeping for one call, on the device. Returns the slot of every written
    frame [B, frames] (and, when the adaptive sink ran, its similarities [B, S] and which lanes fired).

    The tensors are this layer's views (lanes [0, B)); they are updated in place. Order as the
    reference: the sink check may push a sink slot to the queue front, then a full lane takes (and maybe
    pops) the queue head, then filling lanes append the slot one chunk ahead.
    """
    S, L, Q = num_sink, frame_tokens, queue.shape[1]
    slots = table[:, _NCOLS:]
    sim = fired = None
    if sink_check and means is not None:
        # QUIRK 3: a never-written sink slot is all zeros, cosine 0, so it "needs refreshing".
        k_mean, v_mean = means
        sim = (
            F.cosine_similarity(sink_k[:, :S], k_mean, dim=-1)
            + F.cosine_similarity(sink_v[:, :S], v_mean, dim=-1)
        ) / 2
        low, argmin = sim.min(dim=1)
        fired = (low < threshold) & (qlen < Q)
        # Push (argmin + 1)·L to the queue front (QUIRK 4: pushes pile up; one is consumed per pop).
        new_head = torch.where(fired, (qhead - 1) % Q, qhead)
        current = queue.gather(1, new_head[:, None])[:, 0]
        queue.scatter_(1, new_head[:, None], torch.where(fired, (argmin + 1) * L, current)[:, None])
        qhead.copy_(new_head)
        qlen.add_(fired.long())
    if any_full:
        full, popping = table[:, _FULL].bool(), (table[:, _FULL] & table[:, _POP]).bool()
        head_end = queue.gather(1, qhead[:, None])[:, 0]
        new_head = torch.where(popping, (qhead + 1) % Q, qhead)
        new_len = qlen - popping.long()
        # A popped ring slot goes to the back of the queue; a popped sink slot is consumed.
        requeue = popping & (head_end > S * L)
        tail = (new_head + new_len) % Q
        current = queue.gather(1, tail[:, None])[:, 0]
        queue.scatter_(1, tail[:, None], torch.where(requeue, head_end, current)[:, None])
        qhead.copy_(new_head)
        qlen.copy_(new_len + requeue.long())
        full_slots = (head_end // L - frames)[:, None] + torch.arange(frames, device=table.device)
        slots = torch.where(full[:, None], full_slots, slots)
    if any_append:
        append = table[:, _APPEND].bool() & (qlen < Q)
        tail = (qhead + qlen) % Q
        current = queue.gather(1, tail[:, None])[:, 0]
        queue.scatter_(1, tail[:, None], torch.where(append, table[:, _APPEND_VALUE], current)[:, None])
        qlen.add_(append.long())
    if means is not None:
        # Frames written into sink slots leave their means behind (others land in the spare row S).
        rows = torch.where(slots < S, slots, S)[:, :, None].expand(-1, -1, means[0].shape[-1])
        sink_k.scatter_(1, rows, means[0])
        sink_v.scatter_(1, rows, means[1])
    return slots, sim, fired


def track_every_branch(
    *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`track` with both queue branches taken: the same results whatever the call's `any_full` / `any_append`
    (each branch changes only the lanes its mask selects), so one compiled graph serves all of them."""
    return track(*args, any_full=True, any_append=True, **kwargs)
