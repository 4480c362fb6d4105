"""Synthetic input clips for tests."""

from __future__ import annotations

from pathlib import Path

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


def write_png(path: Path, image: torch.Tensor) -> Path:
    """An 8-bit RGB PNG of a uint8 [H, W, 3] image (written with PyAV, as users' reference images would be)."""
    import av

    array = image.contiguous().numpy()
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = array.shape[1], array.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
