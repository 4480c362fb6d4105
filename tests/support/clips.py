"""Synthetic input clips for tests."""

from __future__ import annotations

import torch


def moving_clip(frames: int, height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    """uint8 [T, H, W, 3]: a textured square drifting over a gradient, with a cut two thirds in."""
    gen = torch.Generator().manual_seed(seed)
    texture = torch.rand(height, width, 3, generator=gen)
    ys = torch.linspace(0, 1, height)[:, None, None]
    out = []
    for t in range(frames):
        img = 0.5 * texture + 0.5 * ys.expand(height, width, 3)
        if t > frames * 2 // 3:
            img = 1 - img  # a scene cut
        x = (t * 2) % (width - 8)
        img[4:12, x : x + 8] = torch.tensor([1.0, 0.2, 0.1])
        out.append(img)
    return (torch.stack(out) * 255).round().to(torch.uint8)
