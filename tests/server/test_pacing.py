"""Output pacing on its own (pacing.py): frames keep their input's cadence at one steady delay."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from wanstream.server.pacing import DEFAULT_FPS, Playout, next_slot

FPS = 30.0
GAP = 1.0 / FPS  # the camera's frame interval


@dataclass
class F:
    source_time: float | None
    made: float


def chunk(first_arrival: float, compute: float, n: int = 4) -> list[F]:
    """n input frames 1/FPS apart; the chunk leaves the engine `compute` after its last frame arrived."""
    made = first_arrival + (n - 1) * GAP + compute
    return [F(first_arrival + i * GAP, made) for i in range(n)]


def test_the_delay_is_what_the_chunks_need_and_every_frame_keeps_its_input_spacing() -> None:
    playout = Playout()
    frames = chunk(0.0, compute=0.2)
    playout.observe(frames)
    delay = playout.delay(FPS)
    assert delay == pytest.approx(3 * GAP + 0.2)  # the first frame waited for the chunk, then the compute
    previous = None
    slots = []
    for f in frames:
        previous = playout.slot(f, previous, now=f.made, rate=FPS, depth=4)
        slots.append(previous)
    assert slots[0] == pytest.approx(frames[0].made)  # the first frame goes as soon as it is made
    assert [b - a for a, b in itertools.pairwise(slots)] == pytest.approx([GAP] * 3)  # the camera's cadence
    assert [s - f.source_time for s, f in zip(slots, frames)] == pytest.approx([delay] * 4)  # one latency


def test_a_rare_slow_chunk_does_not_raise_the_delay_and_jitter_adds_at_most_one_interval() -> None:
    playout = Playout()
    for k in range(20):
        playout.observe(chunk(k * 4 * GAP, compute=0.100 + (0.004 if k % 2 else 0.0)))
    steady = playout.delay(FPS)
    assert steady is not None
    playout.observe(chunk(100.0, compute=1.5))  # one compile stall
    assert playout.delay(FPS) == pytest.approx(steady)
    jittery = (
        Playout()
    )  # 11 chunks at 100 ms, 10 at 300 ms: the spread (200 ms) is more than a frame interval
    for k in range(21):
        jittery.observe(chunk(k * 4 * GAP, compute=0.3 if k % 2 else 0.1))
    assert jittery.delay(FPS) == pytest.approx(3 * GAP + 0.1 + GAP)  # the median need + one interval at most


def test_after_a_stretch_of_slow_chunks_the_delay_comes_back_within_four_chunks() -> None:
    playout = Playout()
    for k in range(30):  # a stream compiling new shapes: every chunk takes seconds
        playout.observe(chunk(k * 4 * GAP, compute=2.0 + 0.1 * k))
    assert playout.delay(FPS) > 2.0
    for k in range(3):
        playout.observe(chunk(100.0 + k * 4 * GAP, compute=0.1))
    assert playout.delay(FPS) > 2.0  # one slow chunk is still among the last four
    playout.observe(chunk(101.0, compute=0.1))
    assert playout.delay(FPS) == pytest.approx(3 * GAP + 0.1)  # the last four needed this: nothing more


def test_late_frames_drain_at_twice_the_rate_instead_of_bursting() -> None:
    playout = Playout()
    playout.observe(chunk(0.0, compute=0.1))
    late = chunk(10.0, compute=0.9)  # a hitch: every frame of this chunk is past its due time when made
    now = late[0].made
    slots = []
    previous = now - GAP
    for f in late:
        previous = playout.slot(f, previous, now=now, rate=FPS, depth=4)
        slots.append(previous)
    assert [b - a for a, b in itertools.pairwise(slots)] == pytest.approx([GAP / 2] * 3)


def test_frames_made_from_no_input_are_spread_at_the_engine_rate() -> None:
    playout = Playout()
    playout.observe(chunk(0.0, compute=0.1))
    text = F(source_time=None, made=5.0)
    assert playout.slot(text, previous=5.0, now=5.0, rate=20.0, depth=2) == pytest.approx(5.05)
    assert playout.slot(text, previous=None, now=5.0, rate=20.0, depth=2) == 5.0
    assert next_slot(5.0, 5.0, 20.0, depth=10) == pytest.approx(5.025)  # piling up: faster
    # Before any chunk was observed there is no delay to anchor to: the rate rule applies to every frame.
    assert Playout().slot(F(1.0, 2.0), previous=2.0, now=2.0, rate=None, depth=1) == pytest.approx(2.0)
    assert Playout().delay(None) is None and DEFAULT_FPS > 0
