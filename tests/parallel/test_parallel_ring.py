"""A 3-process ring (gloo, tiny 4-block model): exactly the single-process engine's output, through
prompt changes, live settings, restarts, text mode and a block rebalance mid-stream."""

from __future__ import annotations

import pytest
import torch

from wanstream.engine.random_weights import demo_components
from wanstream.engine.session import SessionError
from wanstream.parallel import ModelSource, Ring
from wanstream.parallel.rebalance import measure

from support.clips import moving_clip
from support.ringcheck import flat, live_settings, on_ring, prompt_changes, reference, stream, text_mode

LAYERS = 4


@pytest.fixture(scope="module")
def ring(one_torch_thread):
    with Ring.start(ModelSource("demo", num_layers=LAYERS), 3, device="cpu", timeout_s=30) as ring:
        yield ring


@pytest.fixture(scope="module")
def components(one_torch_thread):
    return demo_components(num_layers=LAYERS)


@pytest.mark.parametrize("steps", [(700,), (700, 500, 400)])  # 2 steps: the tests below
def test_output_equals_the_single_process_engine(ring: Ring, components, steps) -> None:
    assert ring.layout == [(0, 2), (2, 3), (3, 4)]
    clip = moving_clip(33)
    expected = stream(reference(components, seed=3, steps=steps), clip)
    got = stream(on_ring(ring, seed=3, steps=steps), clip)
    assert got.shape == (33, 32, 48, 3)
    assert torch.equal(got, expected)


def test_prompt_changes_mid_stream_travel_through_the_ring(ring: Ring, components) -> None:
    clip = moving_clip(81)
    expected = prompt_changes(reference(components, seed=5, steps=(700, 500, 400)), clip)
    session = on_ring(ring, seed=5, steps=(700, 500, 400))
    got = prompt_changes(session, clip)
    # The hard cut drops the N − 1 = 2 chunks in flight in one process, and on the ring the same ones.
    assert sum(o.shape[0] for o in got) == sum(o.shape[0] for o in expected) == 81 - 8
    assert torch.equal(flat(got), flat(expected))
    # The transition ran on the ring: blended prompts were in force for some chunks.
    assert any(len(e.prompt) == 2 and e.transition_left for e in session.events)


def test_live_settings_restarts_and_rebuilds_match(ring: Ring, components) -> None:
    clip = moving_clip(78)
    expected = live_settings(reference(components, seed=3, steps=(700, 500, 400)), clip)
    got = live_settings(on_ring(ring, seed=3, steps=(700, 500, 400)), clip)
    assert sum(o.shape[0] for o in got) == sum(o.shape[0] for o in expected)
    assert torch.equal(flat(got), flat(expected))


def test_text_mode_matches(ring: Ring, components) -> None:
    expected = text_mode(reference(components, seed=11, mode="text"))
    got = text_mode(on_ring(ring, seed=11, mode="text"))
    assert torch.equal(flat(got), flat(expected))


def test_blocks_move_mid_stream_without_changing_the_output(ring: Ring, components) -> None:
    clip = moving_clip(41)
    expected = stream(reference(components, seed=2, steps=(700, 500)), clip)
    session = on_ring(ring, seed=2, steps=(700, 500))
    outs = [session.push(clip[:21])]
    assert ring.rebalance([(0, 1), (1, 3), (3, 4)]) == [(0, 1), (1, 3), (3, 4)]  # rank 0 gives block 1
    outs.append(session.push(clip[21:31]))
    assert ring.rebalance([(0, 2), (2, 3), (3, 4)]) == [(0, 2), (2, 3), (3, 4)]  # and takes it back
    outs += [session.push(clip[31:]), session.flush()]
    assert torch.equal(torch.cat(outs), expected)


def test_every_rank_reports_its_stage_times(ring: Ring) -> None:
    session = on_ring(ring, steps=(700, 500))
    session.push(moving_clip(45))
    stats = measure(ring)
    assert [int(r[0]) for r in stats] == [0, 1, 2]
    assert [int(r[1]) for r in stats] == [b - a for a, b in ring.layout]
    for _, _, dit_ms, total_ms, batches, _peak in stats:
        assert batches > 0 and 0 < dit_ms <= total_ms
    # Rank 0 encodes and the last rank decodes: their totals include more than their blocks.
    assert stats[0][3] > stats[0][2] and stats[2][3] > stats[2][2]
    layout = ring.rebalance()  # the one-shot rebalancer from these measurements
    assert layout[0][0] == 0 and layout[-1][1] == LAYERS and all(a < b for a, b in layout)
    assert ring.layout == layout
    session.push(moving_clip(8))  # the stream goes on with the new layout
    ring.rebalance([(0, 2), (2, 3), (3, 4)])


def test_what_a_ring_cannot_run_is_refused_clearly(ring: Ring) -> None:
    with pytest.raises(SessionError, match="stream batch"):
        on_ring(ring, batching="none", steps=(700, 500))
    session = on_ring(ring, steps=(700, 500))
    with pytest.raises(SessionError, match="VACE"):
        session.attach(object())  # type: ignore[arg-type]
    with pytest.raises(SessionError, match="snapshots"):
        session.snapshot()
    with pytest.raises(SessionError, match="LoRA"):
        session.update({"loras": ["style.safetensors"]})
    assert session.push(moving_clip(13)).shape[0] == 5
    with pytest.raises(SessionError, match="stream batch"):
        session.update({"batching": "none"})  # refused before the stream is drained or rebuilt
    assert session.settings.batching == "stream" and not session.at_stream_start
    assert session.push(moving_clip(4)).shape[0] == 0  # still streaming, the lanes intact
    # batching 'none' with one step is the same computation as one lane: accepted
    assert on_ring(ring, batching="none", steps=(700,)).push(moving_clip(5)).shape[0] == 5


def test_a_new_session_takes_over_the_ring(ring: Ring) -> None:
    first = on_ring(ring, steps=(700, 500))
    first.push(moving_clip(13))
    second = on_ring(ring, steps=(700, 500))
    with pytest.raises(SessionError, match="newer session"):
        first.push(moving_clip(8))
    assert second.push(moving_clip(5)).shape[0] == 5
