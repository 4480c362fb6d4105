"""What a `StreamSession` needs from whatever denoises its chunks: one process (`local.Denoiser`) or a ring
of processes (`wanstream.parallel.RingDenoiser`).

A *backend* lives as long as its session: it says which settings it can run, builds a `ChunkDenoiser`
for them (again on every rebuild) and keeps the conditioning it has prepared across rebuilds. A
`ChunkDenoiser` holds one stream's denoising state. Chunks come out in the order they went in, as
`Finished` values: latents for the session to decode, or frames already decoded (the ring's last rank
decodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from wanstream.engine.rng import NoiseSource
from wanstream.engine.settings import StreamSettings
from wanstream.models.dit import StreamExtension


@dataclass
class Finished:
    """A chunk out of the denoiser: exactly one of `x0` and `frames` is set."""

    chunk: int
    x0: torch.Tensor | None = None  # latents [1, F, C, h, w], for the session's decoder
    frames: torch.Tensor | None = None  # frames [1, T, 3, H, W] in [-1, 1], decoded already


class ChunkDenoiser(Protocol):
    """One stream's denoising state (rebuilt when the settings need new buffers)."""

    steps: list[int]
    rng: NoiseSource

    @property
    def lag(self) -> int:
        """Chunks between a chunk going in and coming out."""
        ...

    def first_chunk(
        self,
        noisy: torch.Tensor,
        start: int,
        conditioning: Any,
        *,
        chunk: int,
        extension: StreamExtension | None,
    ) -> list[Finished]:
        """The stream's first chunk (2 latents), every step on it."""
        ...

    def chunk(
        self,
        noisy: torch.Tensor,
        start: int,
        first_step: int | torch.Tensor | None,
        conditioning: Any,
        *,
        chunk: int,
        extension: StreamExtension | None,
        decode: bool,
    ) -> list[Finished]:
        """A later chunk (1 latent) whose first step is `first_step` (None: the last one); `decode` False for a
        flush chunk, whose output nobody reads. Returns the chunks that finished meanwhile, oldest first."""
        ...

    def wait(self) -> Finished:
        """The next chunk in flight, once it has finished (after the flush chunks that push it out)."""
        ...

    def reset(self, steps: Sequence[int] | None = None) -> None:
        """Forget the stream (a new one starts with the next chunk), optionally with new step values."""
        ...

    def retarget(self, steps: Sequence[int]) -> None:
        """New step values, same count, from the next chunk on; the stream goes on."""
        ...

    def timing(self, name: str) -> AbstractContextManager[Any]:
        """Wraps the session's stage `name` ("encode", "dit", "decode") for the backend's own timing."""
        ...

    def weights_changed(self) -> None:
        """The DiT's weights were replaced in place (LoRAs): drop whatever captured the old tensors."""
        ...

    def state(self) -> dict[str, Any]:
        """Everything needed to resume this stream later (the session deep-copies it)."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Drop the stream's buffers; no call follows."""
        ...


class DenoiserBackend(Protocol):
    """Builds a session's `ChunkDenoiser` and prepares its conditioning."""

    #: Why per-chunk conditioning (VACE) cannot run on this backend, or None.
    conditioner_problem: str | None

    def problem(self, settings: StreamSettings) -> str | None:
        """Why this backend cannot run `settings`, or None."""
        ...

    def build(
        self, settings: StreamSettings, rng: NoiseSource, previous: ChunkDenoiser | None
    ) -> ChunkDenoiser:
        """A denoiser for `settings` (the session installs it only once this returns)."""
        ...

    def condition(self, denoiser: ChunkDenoiser, embedding: torch.Tensor, version: int) -> Any:
        """What `first_chunk`/`chunk` take for the prompt embedding of `version` (reused while it holds)."""
        ...

    def forget_conditioning(self) -> None:
        """Prepare the conditioning again at the next chunk (the weights or the prompt state moved)."""
        ...
