"""VACE inputs as users have them: numpy control frames, PIL / numpy reference images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from wanstream.engine.components import Components
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.engine.vace import VaceConditioner, VaceInputError, image_pixels

H, W = 32, 48


def conditioned(components: Components) -> tuple[StreamSession, VaceConditioner]:
    settings = StreamSettings(height=H, width=W, mode="text", batching="none", seed=11)
    s = StreamSession(components, settings, prompts="a cat in the rain")
    cond = VaceConditioner(s)
    s.attach(cond)
    return s, cond


def test_numpy_and_pil_inputs_equal_tensor_inputs(vace_components: Components) -> None:
    gen = torch.Generator().manual_seed(3)
    clip = (torch.rand(9, H, W, 3, generator=gen) * 255).to(torch.uint8)
    ref = clip[0, :20, :24]
    _, cond = conditioned(vace_components)
    cond.set_reference_images(ref, persist=True)
    expected = torch.cat([cond.push(clip), cond.flush()])
    _, cond = conditioned(vace_components)
    cond.set_reference_images(Image.fromarray(ref.numpy()), persist=True)
    got = torch.cat([cond.push(list(clip.numpy())), cond.flush()])
    assert torch.equal(got, expected)
    assert torch.equal(image_pixels(ref.numpy()), image_pixels(ref))


def test_a_non_frame_control_input_is_refused_with_its_type(vace_components: Components) -> None:
    _, cond = conditioned(vace_components)
    with pytest.raises(VaceInputError, match="got dict"):
        cond.push_control({"frames": 1})
    with pytest.raises(VaceInputError, match="got int"):
        image_pixels(3)
    assert cond.pending_control == 0
