"""KV cache bookkeeping rules not pinned by a single golden case."""

from __future__ import annotations

import pytest
import torch

from wanstream.models.kv_cache import KVCache, KVCacheConfig


def make(**kw) -> KVCache:
    cfg = dict(num_layers=1, num_heads=1, head_dim=2, frame_tokens=2)
    cfg.update(kw)
    return KVCache(KVCacheConfig(**cfg))


def test_too_small_ring_is_rejected_with_the_reason() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        make(num_frames=3)


def write_chunks(cache: KVCache, starts_per_call: list[int], frames: list[int]) -> list[list[int]]:
    """Slots written by each call (layer 0, lane 0), found by writing a marker value."""
    written = []
    for i, (start, f) in enumerate(zip(starts_per_call, frames)):
        plan = cache.plan([start], f)
        before = cache.k[0, 0, :, 0].clone()
        k = torch.full((1, f * 2, 1, 2), float(i + 1))
        cache.update(0, k, k, plan)
        changed = (cache.k[0, 0, :, 0] != before).any(-1).nonzero().flatten().tolist()
        written.append(sorted({t // 2 for t in changed}))
    return written


def test_sdv2_fast_config_only_rotates_slots_3_and_4() -> None:
    # kv 5 frames, 2 sinks, one step: the 2-frame first chunk queues slot end 4L, so slot 2 never rotates.
    cache = make(num_frames=5, num_sink=2, sink_threshold=-1)
    L = 2
    starts = [0] + [(k + 1) * L for k in range(1, 9)]
    slots = write_chunks(cache, starts, [2] + [1] * 8)
    assert slots[0] == [0, 1]
    assert [s[0] for s in slots[1:]] == [2, 3, 4, 3, 4, 3, 4, 3]


def test_fifo_keeps_sinks_and_rotates_the_rest_with_repeated_passes_in_place() -> None:
    cache = make(num_frames=6, num_sink=3, eviction="fifo")
    L = 2
    starts, frames = [0, 0], [2, 2]  # two passes over the first chunk
    for k in range(1, 8):
        starts += [(k + 1) * L] * 3  # three passes per chunk (2 steps + a clean pass)
        frames += [1] * 3
    # A plan's table is the cache's one staging buffer (a captured CUDA graph reads it): read it before the next plan.
    slots = [cache.plan([s], f).table[0, 5:].tolist() for s, f in zip(starts, frames)]
    assert slots[:2] == [[0, 1], [0, 1]]
    per_chunk = [slots[2 + 3 * i] for i in range(7)]
    assert all(slots[2 + 3 * i] == slots[3 + 3 * i] == slots[4 + 3 * i] for i in range(7))
    assert per_chunk == [[2], [3], [4], [5], [3], [4], [5]]


def test_lanes_with_different_fill_get_a_mask() -> None:
    cache = make(num_frames=6, lanes=2)
    cache.plan([0], 2)
    cache.broadcast_lane0()
    plan = cache.plan([4, 6], 1)  # lane 0 at frame 2, lane 1 at frame 3
    assert plan.valid == [6, 8]
    assert plan.mask is not None and plan.mask.shape == (2, 1, 1, 8)
    assert plan.mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2


def test_compiled_bookkeeping_is_one_graph_through_the_fill_and_equals_the_eager_code(monkeypatch) -> None:
    """The queue branches' flags turn when the cache first fills, mid-stream: the compiled bookkeeping must not
    specialise on them (it compiled again then, in line on the stream's thread), and must equal the eager
    code, which skips the branches no lane takes."""
    import torch._dynamo

    graphs: list[object] = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting, dynamic=False))
    torch._dynamo.reset()
    try:
        eager, compiled = make(num_frames=5, num_sink=2), make(num_frames=5, num_sink=2).compile()
        g = torch.Generator().manual_seed(0)
        flags = set()
        # Filling (appends), then full (pops, requeues), the adaptive sink checking throughout.
        for i in range(12):
            start = i * 2
            k, v = torch.randn(1, 2, 1, 2, generator=g), torch.randn(1, 2, 1, 2, generator=g)
            for cache in (eager, compiled):
                plan = cache.plan([start], 1)
                flags.add((plan.any_full, plan.any_append))
                cache.update(0, k, v, plan)
            for name in ("k", "v", "sink_k", "sink_v", "queue", "qhead", "qlen"):
                assert torch.equal(getattr(eager, name), getattr(compiled, name)), (i, name)
        assert {(False, True), (True, False)} <= flags  # the stream went through both phases
        assert len(graphs) == 1, f"{len(graphs)} graphs for one shape"
    finally:
        torch._dynamo.reset()
