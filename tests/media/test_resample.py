"""Resampling timestamped frames onto a constant rate (the input of `generate --fps`, VACE's control videos)."""

from __future__ import annotations

import torch

from wanstream.media.resample import resample
from wanstream.media.video import Frame


def test_resample_picks_the_nearest_frame_and_keeps_constant_rates_intact() -> None:
    def frames(times: list[float]):
        return iter([Frame(torch.full((1, 1, 3), i, dtype=torch.uint8), t) for i, t in enumerate(times)])

    same = list(resample(frames([i / 16 for i in range(10)]), 16, 1 / 16))
    assert [int(f.image[0, 0, 0]) for f in same] == list(range(10))
    down = list(resample(frames([i / 30 for i in range(30)]), 16, 1 / 30))
    assert len(down) == 16
    assert [int(f.image[0, 0, 0]) for f in down][:4] == [0, 2, 4, 6]  # 0, 1/16 s → 1.875, 2/16 → 3.75…
    up = list(resample(frames([0.0, 0.5]), 4, 0.5))  # ties go to the earlier frame
    assert [int(f.image[0, 0, 0]) for f in up] == [0, 0, 1, 1]  # 0.25 s is halfway: frame 0
