"""Still images in: a file (PNG, JPEG, WebP, ...) → uint8 [H, W, 3] RGB, with Pillow (as Scope loads them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ImageReadError(ValueError):
    """An image file that is missing or cannot be decoded."""


def read_image(path: str | Path) -> torch.Tensor:
    """An image file → uint8 [H, W, 3] RGB (alpha dropped, grey and palette images expanded)."""
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, DecompressionBombError, OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot read this image ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(array.copy())
