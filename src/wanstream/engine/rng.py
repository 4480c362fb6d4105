"""Where a stream's random numbers come from.

Production draws from a seeded `torch.Generator`, re-seeded for every draw from (seed, chunk, draw), so
each chunk's noise is a pure function of the seed and its index: a session restored at chunk k draws
exactly what a full run drew there. Tests replay the reference's recorded draws through `ReplayNoise`;
that injection is the only test hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, chunk: int, draw: int) -> int:
    """A well-mixed 63-bit seed for draw `draw` of chunk `chunk` (torch seeds must fit int64)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ chunk) ^ draw) >> 1


class NoiseSource(Protocol):
    def randn(
        self, shape: Sequence[int], *, chunk: int, draw: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Standard normal noise for draw `draw` of chunk `chunk`."""
        ...


class SeededNoise:
    """Deterministic per-(seed, chunk, draw) Gaussian noise; no host sync."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def randn(
        self, shape: Sequence[int], *, chunk: int, draw: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(draw_seed(self.seed, chunk, draw))
        return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)


class ReplayNoise:
    """Replays recorded draws in order (the golden cases record every draw the reference made).

    Each draw is checked for its element count, so a draw taken out of order fails loudly.
    """

    def __init__(self, draws: Sequence[torch.Tensor]) -> None:
        self._draws = list(draws)
        self.taken = 0

    def randn(
        self, shape: Sequence[int], *, chunk: int, draw: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        if self.taken >= len(self._draws):
            raise RuntimeError(
                f"replay exhausted: draw {self.taken} (chunk {chunk}, draw {draw}) was not recorded"
            )
        recorded = self._draws[self.taken]
        if recorded.numel() != torch.Size(shape).numel():
            raise RuntimeError(
                f"replay draw {self.taken} has shape {tuple(recorded.shape)}, the engine asked for {tuple(shape)}"
            )
        self.taken += 1
        return recorded.reshape(tuple(shape)).to(device=device, dtype=dtype)

    @property
    def remaining(self) -> int:
        return len(self._draws) - self.taken
