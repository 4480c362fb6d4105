"""The built-in sample clip: deterministic, any size and length, with motion, texture and scene cuts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wanstream.media.sample import (
    SAMPLE_FPS,
    SAMPLE_HEIGHT,
    SAMPLE_WIDTH,
    iter_sample_clip,
    sample_clip,
    scene_cuts,
    write_sample_clip,
)
from wanstream.media.video import read_video

H, W = 64, 112


def frame_changes(clip: torch.Tensor) -> torch.Tensor:
    """Mean absolute change from each frame to the next, in 0–255 units."""
    return (clip[1:].float() - clip[:-1].float()).abs().mean(dim=(1, 2, 3))


def test_deterministic_and_prefix_consistent() -> None:
    clip = sample_clip(49, H, W)
    assert clip.shape == (49, H, W, 3) and clip.dtype == torch.uint8
    assert torch.equal(clip, sample_clip(49, H, W))
    assert torch.equal(sample_clip(10, H, W), clip[:10])  # frame i does not depend on the length
    assert torch.equal(torch.cat(list(iter_sample_clip(49, H, W, batch=8))), clip)


def test_any_size_and_length() -> None:
    for height, width in ((37, 61), (16, 16), (1, 3), (90, 40)):
        assert sample_clip(3, height, width).shape == (3, height, width, 3)
    assert sample_clip(0, H, W).shape == (0, H, W, 3)
    assert sample_clip(1).shape == (1, SAMPLE_HEIGHT, SAMPLE_WIDTH, 3)
    for bad in ({"num_frames": -1}, {"height": 0}, {"width": -5}, {"fps": 0}):
        with pytest.raises(ValueError):
            sample_clip(**{"num_frames": 2, "height": H, "width": W, **bad})


def test_scene_cuts_every_two_and_a_half_seconds() -> None:
    assert scene_cuts(81, SAMPLE_FPS) == [40, 80]
    assert scene_cuts(40, SAMPLE_FPS) == []
    assert scene_cuts(31, 12.0) == [30]
    clip = sample_clip(81, H, W)
    changes = frame_changes(clip)
    cut_changes = changes[[39, 79]]  # change into frames 40 and 80
    calm = torch.cat([changes[:39], changes[40:79]])
    assert cut_changes.min() > 5 * calm.median()


def test_there_is_always_motion_and_it_varies() -> None:
    changes = frame_changes(sample_clip(81, H, W))
    within_scenes = torch.cat([changes[:39], changes[40:79]])
    assert within_scenes.min() > 0.5  # never a frozen frame
    # The pan swells from standstill: motion in the first scene grows well beyond its start.
    assert changes[20:39].mean() > 1.5 * changes[:5].mean()


def test_frames_have_texture_and_colour() -> None:
    clip = sample_clip(81, H, W)
    for i in (0, 20, 45, 70):
        frame = clip[i].float()
        assert frame.std() > 20  # not flat
        assert (
            len(torch.unique(clip[i].reshape(-1, 3), dim=0)) > 500
        )  # gradients and textures, not flat fills
    # Both scenes look different: compare mean colours across the cut.
    assert (clip[39].float().mean((0, 1)) - clip[40].float().mean((0, 1))).abs().max() > 20


def test_write_sample_clip(tmp_path: Path) -> None:
    path = write_sample_clip(tmp_path / "sample.mp4", num_frames=12, height=H, width=W)
    assert path == tmp_path / "sample.mp4"
    frames, times, info = read_video(path)
    assert frames.shape == (12, H, W, 3) and info.fps == SAMPLE_FPS
    assert times.tolist() == [i / SAMPLE_FPS for i in range(12)]
    assert (frames.float() - sample_clip(12, H, W).float()).abs().mean() < 8
