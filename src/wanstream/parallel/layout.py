"""Where each rank of the ring runs: the DiT blocks it owns (contiguous [start, stop) ranges, rank 0 first)
and its device. The launcher and the worker processes both read it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Layout = list[tuple[int, int]]


def device_for(device_type: str, rank: int) -> torch.device:
    """Rank r's device: GPU r of this host, or the CPU for every rank of a CPU ring."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def split_blocks(num_layers: int, ranks: int) -> Layout:
    """StreamDiffusionV2's default split: num_layers // ranks each, the remainder to the first ranks
    (30 blocks on 4 ranks: [0, 8), [8, 16), [16, 23), [23, 30))."""
    if ranks < 1:
        raise ValueError(f"a ring needs at least one rank, got {ranks}")
    if num_layers < ranks:
        raise ValueError(f"{num_layers} DiT blocks cannot be split over {ranks} ranks (each needs one)")
    base, extra = divmod(num_layers, ranks)
    return from_counts([base + (r < extra) for r in range(ranks)])


def from_counts(counts: Sequence[int]) -> Layout:
    """Block counts per rank → contiguous ranges."""
    if any(c < 1 for c in counts):
        raise ValueError(f"every rank needs at least one block, got counts {list(counts)}")
    layout, start = [], 0
    for c in counts:
        layout.append((start, start + c))
        start += c
    return layout


def check_layout(layout: Sequence[Sequence[int]], num_layers: int, ranks: int) -> Layout:
    """A layout given by hand (tests, `--layout`): contiguous, covering every block, one range per rank."""
    ranges = [(int(a), int(b)) for a, b in layout]
    if len(ranges) != ranks:
        raise ValueError(f"layout has {len(ranges)} ranges for {ranks} ranks")
    if ranges[0][0] != 0 or ranges[-1][1] != num_layers:
        raise ValueError(f"layout {ranges} must cover blocks [0, {num_layers})")
    for (a, b), (c, _) in zip(ranges, [*ranges[1:], (num_layers, num_layers)]):
        if not a < b or b != c:
            raise ValueError(f"layout {ranges} is not a chain of non-empty contiguous ranges")
    return ranges


def owner(layout: Layout, block: int) -> int:
    return next(r for r, (a, b) in enumerate(layout) if a <= block < b)
