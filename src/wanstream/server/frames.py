"""The frames that pass between the engine worker and the server's inputs and outputs.

Kept apart from the worker so that sinks and sources (server/io, tracks, recording) name these types without
importing the worker: the worker imports them, never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import av
import numpy as np
import torch

# A frame as sources hand it over: an aiortc/PyAV frame (converted only if sampled) or RGB uint8 [H, W, 3].
SourceFrame = av.VideoFrame | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class OutputFrame:
    image: np.ndarray  # [H, W, 3] uint8 RGB on the CPU (a view into its chunk's array)
    epoch: int
    chunk: int
    prompt: tuple[tuple[str, float], ...]
    source_time: float | None  # time.monotonic() when its input frame arrived (None in text mode)
    made: float  # time.monotonic() when it left the engine
    index: int = -1  # the session's output frame index (the session log's digests are keyed by it)


class FrameSink(Protocol):
    """Where the worker hands generated frames: the WebRTC track, the recorder, every `server/io` sink."""

    def put(self, frames: Sequence[OutputFrame]) -> None:
        """Take frames without blocking (called on the worker thread)."""
        ...

    def flush(self, epoch: int) -> None:
        """Drop every frame older than `epoch` (called on the worker thread)."""
        ...
