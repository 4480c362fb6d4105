"""A decoded frame with its presentation time, and the tolerance every timestamp comparison uses.

Apart from video.py so that code which only reasons about time (timelines, resampling, planning) needs
neither PyAV nor a decoder to import."""

from __future__ import annotations

from typing import NamedTuple

import torch

# Timestamps within this many seconds of a boundary count as on it (decoders round pts). Timelines use it too.
TIME_EPS = 1e-6


class Frame(NamedTuple):
    image: torch.Tensor  # [H, W, 3] uint8 RGB
    time: float  # presentation time in seconds from the first frame
