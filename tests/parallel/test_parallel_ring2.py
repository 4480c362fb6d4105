"""A 2-process ring (gloo, the 2-block demo model): the same output as one process."""

from __future__ import annotations

import pytest
import torch

from wanstream import Pipeline
from wanstream.parallel import ModelSource, Ring

from support.clips import moving_clip
from support.ringcheck import flat, on_ring, prompt_changes, reference, stream


@pytest.fixture(scope="module")
def ring(one_torch_thread):
    with Ring.start(ModelSource("demo"), 2, device="cpu", timeout_s=30) as ring:
        yield ring


@pytest.fixture(scope="module")
def components(one_torch_thread):
    return Pipeline.demo().components


def test_two_ranks_one_block_each_match_one_process(ring: Ring, components) -> None:
    assert ring.layout == [(0, 1), (1, 2)]
    clip = moving_clip(37)
    for steps in ((700, 500), (700, 500, 400, 200)):
        expected = stream(reference(components, seed=1, steps=steps), clip, step=5)
        got = stream(on_ring(ring, seed=1, steps=steps), clip, step=5)
        assert got.shape == (37, 32, 48, 3) and torch.equal(got, expected)


def test_long_stream_through_cache_eviction_and_rope_resets(ring: Ring, components) -> None:
    """Positions restart every few chunks (rope_reset_frame 8) while the full cache evicts (adaptive sink
    on): still the same output."""
    clip = moving_clip(81)
    settings = dict(seed=4, steps=(700, 500), rope_reset_frame=8)
    expected = stream(reference(components, **settings), clip)
    session = on_ring(ring, **settings)
    got = stream(session, clip)
    assert torch.equal(got, expected)
    positions = [e.position for e in session.events if e.kind == "input"]
    assert positions.count(5) >= 3  # restarted at kv_cache_frames − 1 several times


def test_prompt_changes_mid_stream_on_two_ranks(ring: Ring, components) -> None:
    clip = moving_clip(81)
    expected = prompt_changes(reference(components, seed=8, steps=(700, 500)), clip)
    got = prompt_changes(on_ring(ring, seed=8, steps=(700, 500)), clip)
    assert sum(o.shape[0] for o in got) == sum(o.shape[0] for o in expected)
    assert torch.equal(flat(got), flat(expected))


def test_uint8_output_and_push_granularity(ring: Ring, components) -> None:
    """The default uint8 output, frames pushed one at a time: what the CLI and server see."""
    clip = moving_clip(21)
    expected = stream(Pipeline(components).session(prompts=["a red fox"], height=32, width=48), clip)
    got = stream(ring.session(prompts=["a red fox"], height=32, width=48), clip, step=1)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)
