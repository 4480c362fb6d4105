"""Frames as users have them → the engine's `[T, H, W, C]` tensor, at the public API's boundary.

Accepted: a torch tensor or a numpy array `[T, H, W, C]` (or one frame `[H, W, C]`), a PIL image, or a
list/tuple of any of these (frames of one size). Values stay as given (uint8, or float in [0, 1]); the
session maps them to the model's range. Nothing here imports PIL: an image is recognised by its
`convert` method and converted to RGB, so a PNG with alpha or a grey JPEG works as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

FrameInput: TypeAlias = "torch.Tensor | np.ndarray | Any | Sequence[torch.Tensor | np.ndarray | Any]"


def as_frames(frames: FrameInput, channels: tuple[int, ...] = (3,)) -> torch.Tensor:
    """`frames` as a `[T, H, W, C]` tensor (no copy for a tensor or a writable contiguous array).

    Raises `TypeError` for something that is not frames and `ValueError` for the wrong shape, with the
    shape or type in the message. `channels`: the C values allowed (the main input: 3)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("no frames given (an empty list)")
        parts = [as_tensor(f) for f in frames]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"the frames of a list must share one size, got {sorted(shapes)}")
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            raise ValueError(f"the frames of a list must share one dtype, got {sorted(map(str, dtypes))}")
        given = f"a list of {len(parts)} frames of {tuple(parts[0].shape)}"
        x = torch.cat([_with_time_axis(p) for p in parts])
    else:
        x = as_tensor(frames)
        given = str(tuple(x.shape))
        x = _with_time_axis(x)
    if x.dim() != 4 or x.shape[-1] not in channels:
        want = " or ".join(str(c) for c in channels)
        raise ValueError(f"frames must be [T, H, W, {want}] (or one [H, W, {want}] frame), got {given}")
    return x


def as_tensor(item: Any) -> torch.Tensor:
    """A tensor as it is; a numpy array (uint8 or float) or a PIL image (as RGB) → a tensor of its shape."""
    if hasattr(item, "convert") and hasattr(item, "mode"):  # a PIL image
        item = np.asarray(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint8 or np.issubdtype(item.dtype, np.floating):
            x = torch.from_numpy(np.ascontiguousarray(item) if item.flags.writeable else item.copy())
        else:
            raise TypeError(f"frames must be uint8 or float, got a numpy array of {item.dtype}")
    elif isinstance(item, torch.Tensor):
        x = item
    else:
        raise TypeError(
            f"frames must be a torch tensor, a numpy array, a PIL image or a list of them, got {type(item).__name__}"
        )
    return x


def _with_time_axis(x: torch.Tensor) -> torch.Tensor:
    return x[None] if x.dim() == 3 else x
