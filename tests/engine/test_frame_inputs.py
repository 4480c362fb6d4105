"""Frames as users have them (numpy arrays, PIL images, lists, one frame) and a single string as a prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wanstream import Pipeline
from wanstream.engine.frames import as_frames
from wanstream.engine.session import SessionError

from support.clips import moving_clip

SMALL = dict(height=32, width=48)


def run(session, pushes) -> torch.Tensor:
    return torch.cat([*(session.push(p) for p in pushes), session.flush()])


def test_numpy_pil_lists_and_single_frames_give_the_tensor_result(demo_pipeline: Pipeline) -> None:
    clip = moving_clip(9)
    reference = run(demo_pipeline.session(prompts=["a red fox"], seed=1, **SMALL), [clip])
    array = clip.numpy()
    forms = {
        "numpy [T, H, W, 3]": [array],
        "numpy float [0, 1]": [array.astype(np.float32) / 255],
        "numpy, not contiguous": [np.ascontiguousarray(array[:, :, ::-1])[:, :, ::-1]],
        "list of numpy frames": [list(array)],
        "one numpy frame at a time": list(array),
        "PIL images, one at a time": [Image.fromarray(f) for f in array],
        "a list of PIL images": [[Image.fromarray(f) for f in array]],
        "a list of tensors": [list(clip)],
    }
    for name, pushes in forms.items():
        out = run(demo_pipeline.session(prompts=["a red fox"], seed=1, **SMALL), pushes)
        assert out.dtype == torch.uint8 and out.shape == reference.shape, name
        if name == "numpy float [0, 1]":  # x/255·2−1 vs x/127.5−1: equal up to float rounding
            assert (out.int() - reference.int()).abs().max() <= 2, name
        else:
            assert torch.equal(out, reference), name


def test_pil_images_in_other_modes_become_rgb() -> None:
    grey = Image.fromarray(np.full((16, 24), 200, np.uint8))
    rgba = Image.fromarray(np.full((16, 24, 4), 100, np.uint8))
    x = as_frames([grey, rgba])
    assert x.shape == (2, 16, 24, 3) and x.dtype == torch.uint8
    assert x[0].unique().tolist() == [200] and x[1].unique().tolist() == [100]


def test_bad_frames_say_what_was_given_and_leave_the_session_intact(demo_pipeline: Pipeline) -> None:
    s = demo_pipeline.session(prompts=["a red fox"], **SMALL)
    s.push(moving_clip(3))
    bad = {
        "a string": ("frames.mp4", "got str"),
        "an empty list": ([], "empty list"),
        "grey frames": (np.zeros((4, 32, 48), np.uint8), r"got \(4, 32, 48\)"),
        "int64 array": (np.zeros((4, 32, 48, 3), np.int64), "int64"),
        "mixed sizes": ([np.zeros((32, 48, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)], "one size"),
    }
    for name, (frames, message) in bad.items():
        with pytest.raises(SessionError, match=message):
            s.push(frames)
        assert (s.frames_in, s.pending_frames) == (3, 3), name


def test_a_single_string_is_one_prompt(demo_pipeline: Pipeline) -> None:
    clip = moving_clip(9)
    listed = run(demo_pipeline.session(prompts=["a cat"], seed=2, **SMALL), [clip])
    s = demo_pipeline.session(seed=2, **SMALL)
    s.set_prompts("a cat")
    assert s.prompt.describe() == (("a cat", 1.0),)
    assert torch.equal(run(s, [clip]), listed)
    assert torch.equal(run(demo_pipeline.session(prompts="a cat", seed=2, **SMALL), [clip]), listed)
