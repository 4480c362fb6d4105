"""Pure parts of the ring: block layouts, the rebalancer's rule, and the schedule's invariants."""

from __future__ import annotations

import pytest

from wanstream.models.kv_cache import KVCacheConfig
from wanstream.parallel.layout import check_layout, from_counts, owner, split_blocks
from wanstream.parallel.rebalance import balanced_counts
from wanstream.parallel.schedule import RingSchedule
from wanstream.parallel.stage import Lane


def test_default_split_matches_streamdiffusionv2() -> None:
    assert split_blocks(30, 2) == [(0, 15), (15, 30)]
    assert split_blocks(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert split_blocks(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert owner(split_blocks(30, 4), 16) == 2
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        split_blocks(3, 4)


@pytest.mark.parametrize(
    "layout, message",
    [
        ([(0, 2), (2, 4)], "2 ranges for 3 ranks"),
        ([(0, 1), (2, 3), (3, 4)], "not a chain"),
        ([(0, 2), (2, 2), (2, 4)], "not a chain"),
        ([(1, 2), (2, 3), (3, 4)], "must cover"),
        ([(0, 2), (2, 3), (3, 5)], "must cover"),
    ],
)
def test_bad_layouts_are_refused(layout: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_layout(layout, 4, 3)
    with pytest.raises(ValueError, match="at least one block"):
        from_counts([2, 0, 2])


def test_rebalancer_takes_blocks_from_the_ranks_that_also_run_the_vae() -> None:
    # 4 ranks × 30 blocks, 1 ms per block; rank 0 also encodes (+4 ms), the last decodes (+6 ms).
    counts = [8, 8, 7, 7]
    dit = [float(c) for c in counts]
    total = [dit[0] + 4, dit[1], dit[2], dit[3] + 6]
    new = balanced_counts(counts, dit, total)
    assert sum(new) == 30 and min(new) >= 1
    assert new[0] < counts[0] and new[3] < counts[3] and new[1] > counts[1] and new[2] > counts[2]
    # After the move every stage's total is within a block of the others.
    totals = [new[r] + (4 if r == 0 else 6 if r == 3 else 0) for r in range(4)]
    assert max(totals) - min(totals) <= 1
    assert balanced_counts(counts, dit, [7.5] * 4) == counts  # equal stage times: nothing moves
    assert balanced_counts([1, 1, 1], [1.0, 1.0, 1.0], [1.0, 1.0, 100.0]) == [1, 1, 1]  # at least one each


def test_lanes_survive_the_json_header() -> None:
    lane = Lane(7, 1, 480, 3, 2880, 2400, True, 500, 42, True, False)
    assert Lane.from_json(lane.to_json()) == lane


def _schedule(ranks: int, steps: int) -> RingSchedule:
    cache = KVCacheConfig(num_layers=1, num_heads=1, head_dim=2, frame_tokens=6, num_frames=6, num_sink=3)
    return RingSchedule(ranks, [700, 500, 400, 200][:steps], cache)


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_ring_batches_compute_every_single_process_pair_once_in_cache_order(ranks: int, steps: int) -> None:
    """Each (chunk, step) the single-process engine computes is computed once, after its previous step
    came back, in chunk order per lane; warm-up pairs start from zeros; only finished chunks decode."""
    s = _schedule(ranks, steps)
    s.first_chunk(chunk=100, start=0, frames=2, seed=1, version=1)
    batches = 40
    where: dict[tuple[int, int], int] = {}  # (chunk, step) → batch
    last_chunk_per_lane: dict[int, int] = {}
    for m in range(1, batches + 1):
        s.call(100 + m, s.after + (m - 1) * 6, None, 1, 1, decode=True)
        plan = s.batch(m)
        assert len(plan.lanes) == steps  # always N lanes: the single-process batch shape
        for j, (lane, source) in enumerate(zip(plan.lanes, plan.sources)):
            c = lane.chunk - 100
            assert lane.step == j and c == m - j * ranks
            if not lane.live:
                assert c < 1 - j  # padding: a pair one process never computes
                continue
            assert (c, j) not in where
            where[(c, j)] = m
            assert last_chunk_per_lane.get(j, -(10**9)) < c  # lane j's cache sees chunks in order
            last_chunk_per_lane[j] = c
            if j == 0:
                assert source == "noisy" and c == m
            elif c == 1 - j:
                assert source == "zeros"  # a warm-up chunk enters at this step
            else:
                assert source == "return" and where[(c, j - 1)] == m - ranks  # came back after one trip
            assert lane.decode == (j == steps - 1 and c >= 1)
            assert lane.renoise == (None if j == steps - 1 else [700, 500, 400, 200][j + 1])
    # Every pair of the single-process calls 1..batches − (N−1)·R is there.
    for call in range(1, batches - (steps - 1) * ranks + 1):
        for j in range(steps):
            assert (call - j, j) in where
