"""The motion-aware noise controller: fast motion → less noise (more faithful), static → more noise.

Per chunk: motion = max over the chunk's frames of the RMS pixel difference to the previous frame
(the first compared with the previous chunk's last frame), divided by 0.2 and clipped to [0, 1];
s ← 0.9·(s₀ − 0.1·motion) + 0.1·s_prev, and the chunk's first timestep becomes int(1000·s) − 100.
Everything stays on the device (float64 scalars, the reference's exact operation order): no sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wanstream.models.scheduler import chunk_motion, controlled_noise_scale_device, first_step_for


@dataclass
class ChunkNoise:
    scale: torch.Tensor  # float64 device scalar: σ of the SDEdit noise mixed into the input latents
    first_step: torch.Tensor  # int64 device scalar: the timestep told to the DiT on the first step
    motion: torch.Tensor | None  # float device scalar, None when the controller is off


class NoiseController:
    def __init__(self, initial: float, enabled: bool = True) -> None:
        self.initial = float(initial)
        self.enabled = enabled
        self.previous: torch.Tensor | None = None
        self.last_frame: torch.Tensor | None = None  # [1, 3, 1, H, W] pixels in [-1, 1]

    def reset(self) -> None:
        self.previous = None
        self.last_frame = None

    def state(self) -> dict[str, Any]:
        """Everything the next chunk's noise depends on (for snapshots)."""
        return {
            "initial": self.initial,
            "enabled": self.enabled,
            "previous": self.previous,
            "last_frame": self.last_frame,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.initial = state["initial"]
        self.enabled = state["enabled"]
        self.previous = state["previous"]
        self.last_frame = state["last_frame"]

    def first_chunk(self, frames: torch.Tensor) -> ChunkNoise:
        """The stream's first chunk uses the initial scale (its first step stays the canonical one)."""
        device = frames.device
        self.previous = torch.tensor(self.initial, dtype=torch.float64, device=device)
        self.last_frame = frames[:, :, -1:]
        return ChunkNoise(self.previous, torch.tensor(first_step_for(self.initial), device=device), None)

    def next_chunk(self, frames: torch.Tensor) -> ChunkNoise:
        """frames [1, 3, T, H, W] in [-1, 1]: this chunk's input, at model resolution."""
        device = frames.device
        if self.last_frame is None or self.previous is None:
            return self.first_chunk(frames)
        if self.enabled:
            motion = chunk_motion(torch.cat([self.last_frame, frames], dim=2))
            scale, step = controlled_noise_scale_device(motion, self.previous, self.initial)
        else:
            motion = None
            scale = torch.tensor(self.initial, dtype=torch.float64, device=device)
            step = torch.tensor(first_step_for(self.initial), device=device)
        self.previous = scale
        self.last_frame = frames[:, :, -1:]
        return ChunkNoise(scale, step, motion)
