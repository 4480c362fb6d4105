"""Per-rank stage times for the rebalancer: CUDA events on a GPU (no sync until read), the host clock
on a CPU. Only steady batches are recorded (every lane live, not a stream's first chunk)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from wanstream.engine.measure import elapsed_ms, percentile, stamp

Interval = tuple[str, Any, Any]


class StageClock:
    def __init__(self, device: torch.device, keep: int = 64) -> None:
        self.cuda = device.type == "cuda"
        self.batches: deque[list[Interval]] = deque(maxlen=keep)
        self._current: list[Interval] | None = None
        self._carry: list[Interval] = []  # rank 0's encode, timed before its batch starts

    @contextmanager
    def batch(self, record: bool) -> Iterator[None]:
        """One ring batch on this rank; the intervals timed inside belong to it."""
        self._current = self._carry if record else None
        self._carry = []
        try:
            yield
        finally:
            if self._current:
                self.batches.append(self._current)
            self._current = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        target = self._current
        if target is None:
            yield
            return
        start = self._stamp()
        yield
        target.append((name, start, self._stamp()))

    @contextmanager
    def before_batch(self, name: str) -> Iterator[None]:
        """Time work done for the next batch before it starts (rank 0's VAE encode)."""
        start = self._stamp()
        yield
        self._carry.append((name, start, self._stamp()))

    def _stamp(self) -> Any:
        return stamp(self.cuda)

    def report(self, rank: int, blocks: int) -> list[float]:
        """[rank, blocks, DiT ms, total ms, batches]: medians over the recorded batches."""
        if self.cuda:
            torch.cuda.synchronize()
        dit, total = [], []
        for intervals in self.batches:
            times = [(name, elapsed_ms(a, b)) for name, a, b in intervals]
            dit.append(sum(ms for name, ms in times if name == "dit"))
            total.append(sum(ms for _, ms in times))
        if not dit:
            return [rank, blocks, 0.0, 0.0, 0]
        return [rank, blocks, percentile(dit, 0.5), percentile(total, 0.5), len(dit)]

    def peak_gib(self, device: torch.device) -> float:
        return torch.cuda.max_memory_allocated(device) / 2**30 if self.cuda else float("nan")

    def clear(self) -> None:
        self.batches.clear()
        self._carry = []
