"""The stream session on tiny random models: determinism, chunking, live control, bad input."""

from __future__ import annotations

import gc
import itertools
import os

import pytest
import torch
from pydantic import ValidationError

from wanstream import Pipeline
from wanstream.engine.prompts import Transition, WeightedPrompt
from wanstream.engine.settings import SettingsUpdate, StreamSettings

from support.clips import moving_clip

SMALL = dict(height=32, width=48)


def run_all(session, clip: torch.Tensor, step: int = 7) -> torch.Tensor:
    outs = [session.push(clip[i : i + step]) for i in range(0, clip.shape[0], step)]
    outs.append(session.flush())
    return torch.cat(outs)


@pytest.mark.parametrize("batching", ["stream", "none"])
def test_same_seed_same_inputs_gives_bit_identical_output(demo_pipeline: Pipeline, batching: str) -> None:
    clip = moving_clip(21)
    a = run_all(demo_pipeline.session(prompts=["a red fox"], batching=batching, seed=3, **SMALL), clip)
    b = run_all(
        demo_pipeline.session(prompts=["a red fox"], batching=batching, seed=3, **SMALL), clip, step=4
    )
    c = run_all(demo_pipeline.session(prompts=["a red fox"], batching=batching, seed=4, **SMALL), clip)
    assert torch.equal(a, b)  # push granularity does not matter
    assert not torch.equal(a, c)  # the seed does


@pytest.mark.parametrize("batching", ["stream", "none"])
@pytest.mark.parametrize("frames", [1, 4, 5, 6, 9, 21, 23])
def test_output_has_exactly_as_many_frames_as_input(
    demo_pipeline: Pipeline, batching: str, frames: int
) -> None:
    session = demo_pipeline.session(prompts=["a red fox"], batching=batching, **SMALL)
    out = run_all(session, moving_clip(frames))
    assert out.shape == (frames, 32, 48, 3) and out.dtype == torch.uint8
    ranges = [e.output_frames for e in session.events if e.kind == "input"]
    assert ranges[0][0] == 0 and ranges[-1][1] == frames
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, in order


# Frames out of push(chunk 0 = 5 frames), push(chunk 1), push(chunk 2), flush(), derived from the algorithm:
# chunk 0 is denoised through every step at once (prepare) and decoded at once. No batch: every later chunk
# runs all its steps in its own push, so it comes out there (latency 0). Stream batch with n steps: a chunk
# enters lane 0 and leaves lane n-1 n-1 calls later, i.e. n-1 pushes later; what is still in the lanes when
# the input ends comes out at flush.
LAG_TABLE = [
    ("none", (700, 500), [5, 4, 4, 0]),
    ("none", (700, 500, 400), [5, 4, 4, 0]),
    ("stream", (700, 500), [5, 0, 4, 4]),  # chunk 1 out with chunk 2's push, chunk 2 at flush
    ("stream", (700, 500, 400), [5, 0, 0, 8]),  # chunks 1 and 2 both still in the lanes at flush
]


@pytest.mark.parametrize(("batching", "steps", "expected"), LAG_TABLE)
def test_stream_batch_lags_n_minus_1_chunks_and_no_batch_none(
    demo_pipeline: Pipeline, batching: str, steps: tuple[int, ...], expected: list[int]
) -> None:
    clip = moving_clip(13)
    s = demo_pipeline.session(prompts=["x"], batching=batching, steps=steps, **SMALL)
    got = [s.push(clip[:5]).shape[0], s.push(clip[5:9]).shape[0], s.push(clip[9:13]).shape[0]]
    got.append(s.flush().shape[0])
    assert got == expected


def test_first_steps_follow_the_noise_controller(demo_pipeline: Pipeline) -> None:
    s = demo_pipeline.session(prompts=["x"], noise_scale=0.8, **SMALL)
    run_all(s, moving_clip(21))
    events = [e for e in s.events if e.kind == "input"]
    assert events[0].timesteps == [700, 500]  # the first chunk keeps the canonical list
    for e in events[1:]:
        assert e.timesteps[0] == int(1000 * e.noise_scale) - 100
        assert 0.7 - 1e-9 <= e.noise_scale <= 0.8 + 1e-9
    off = demo_pipeline.session(prompts=["x"], noise_scale=0.6, noise_controller=False, **SMALL)
    run_all(off, moving_clip(13))
    assert [e.timesteps[0] for e in off.events if e.kind == "input"][1:] == [500, 500]


def test_snapshot_then_restore_replays_the_tail_bit_exactly(demo_pipeline: Pipeline) -> None:
    clip = moving_clip(29)
    s = demo_pipeline.session(prompts=["a red fox"], **SMALL)
    head = s.push(clip[:13])
    snap = s.snapshot()
    tail = torch.cat([s.push(clip[13:]), s.flush()])
    # Any later work (a different prompt, more frames) must not leak into the restored state.
    s.set_prompts(["something else entirely"])
    s.push(moving_clip(8, seed=9))
    s.restore(snap)
    again = torch.cat([s.push(clip[13:]), s.flush()])
    assert torch.equal(tail, again)
    assert head.shape[0] + tail.shape[0] == 29


def test_a_session_made_in_inference_mode_works_outside_it(demo_pipeline: Pipeline) -> None:
    """Made inside `torch.inference_mode()` (a notebook cell, the server's engine thread), its buffers are
    inference tensors, which torch refuses to update in place outside it: a later push outside it failed
    mid-chunk. Every call now runs in the mode the session was made in — the same frames as all inside it."""
    clip = moving_clip(21)

    def drive(inside: bool) -> torch.Tensor:
        with torch.inference_mode():
            session = demo_pipeline.session(prompts=["a red fox"], seed=3, **SMALL)
            first = session.push(clip[:5])
        with torch.inference_mode(inside):
            outs = [first, session.push(clip[5:9])]
            outs.append(session.update({"seed": 4, "noise_scale": 0.6}))
            session.set_prompts("snow", transition=Transition(steps=2))
            snap = session.snapshot()
            outs.append(session.push(clip[9:13]))
            session.restore(snap)
            outs += [session.push(clip[9:17]), session.reset(), session.push(clip[17:21]), session.flush()]
            session.close()
        return torch.cat(outs)

    assert torch.equal(drive(inside=False), drive(inside=True))


def test_hard_cut_restarts_the_stream_refresh_keeps_it(demo_pipeline: Pipeline) -> None:
    clip = moving_clip(25)
    cut = demo_pipeline.session(prompts=["a red fox"], **SMALL)
    cut.push(clip[:13])
    cut.set_prompts(["a blue whale"], switch="cut")
    cut.push(clip[13:])
    starts = [e for e in cut.events if e.stream_start]
    assert len(starts) == 2 and starts[1].position == 0  # positions and caches restarted
    assert cut.denoiser.cache.host.lanes[0].local_end > 0

    keep = demo_pipeline.session(prompts=["a red fox"], **SMALL)
    keep.push(clip[:13])
    before = keep.denoiser.cache.k.clone()
    keep.set_prompts(["a blue whale"], switch="refresh")
    assert torch.equal(before, keep.denoiser.cache.k)  # nothing reset
    keep.push(clip[13:17])
    assert [e.stream_start for e in keep.events].count(True) == 1
    assert keep.events[-1].prompt == (("a blue whale", 1.0),)


def test_transition_interpolates_for_exactly_k_chunks(demo_pipeline: Pipeline) -> None:
    s = demo_pipeline.session(prompts=["a red fox"], **SMALL)
    clip = moving_clip(45)
    s.push(clip[:9])
    versions = []
    s.set_prompts(["a blue whale"], transition=Transition(steps=3, method="slerp"))
    for i in range(5):
        s.push(clip[9 + 4 * i : 13 + 4 * i])
        versions.append((s.events[-1].transition_left, s.prompt.version))
    # three chunks blend (2, 1, 0 steps left after each), then the target stays in force
    assert [v[0] for v in versions] == [2, 1, 0, 0, 0]
    assert versions[0][1] < versions[1][1] < versions[2][1] == versions[3][1] == versions[4][1]
    target = s._prompt_cache.get_many(["a blue whale"])[0]
    assert torch.equal(s.prompt.embedding, target)


def test_unchanged_prompts_are_never_re_encoded(demo_pipeline: Pipeline) -> None:
    s = demo_pipeline.session(prompts=["a red fox", "snow"], **SMALL)
    encoded = s._prompt_cache.encoded
    s.set_prompts([WeightedPrompt(text="a red fox", weight=2.0), WeightedPrompt(text="snow", weight=1.0)])
    s.set_prompts(["snow"])
    assert s._prompt_cache.encoded == encoded


def test_weighted_blend_is_normalised(demo_pipeline: Pipeline) -> None:
    s = demo_pipeline.session(
        prompts=[WeightedPrompt(text="a red fox", weight=3), WeightedPrompt(text="snow", weight=1)], **SMALL
    )
    assert s.prompt.describe() == (("a red fox", 0.75), ("snow", 0.25))
    a, b = s._prompt_cache.get_many(["a red fox", "snow"])
    s2 = demo_pipeline.session(
        prompts=[WeightedPrompt(text="a red fox", weight=30), WeightedPrompt(text="snow", weight=10)], **SMALL
    )
    assert torch.allclose(s.prompt.embedding, s2.prompt.embedding)
    assert not torch.allclose(s.prompt.embedding, a) and not torch.allclose(s.prompt.embedding, b)


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        (dict(height=50), "height", "multiple of 16"),
        (dict(width=100), "width", "multiple of 16"),
        (dict(steps=()), "steps", "empty"),
        (dict(steps=(500, 700)), "steps", "descending"),
        (dict(steps=(700, 700)), "steps", "descending"),
        (dict(steps=(1200,)), "steps", "(0, 1000]"),
        (dict(noise_scale=1.5), "noise_scale", "less than or equal to 1"),
        (dict(noise_scale=-0.1), "noise_scale", "greater than or equal to 0"),
        (dict(mode="sketch"), "mode", "'video' or 'text'"),
        (dict(batching="sometimes"), "batching", "'stream' or 'none'"),
        (dict(sink_frames=6, kv_cache_frames=6), "sink_frames", "below kv_cache_frames"),
        (dict(batching="stream", cache_context="clean"), "cache_context", "needs batching 'none'"),
    ],
)
def test_bad_settings_are_rejected_with_a_clear_message(bad: dict, field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as err:
        StreamSettings(**bad)
    assert len(err.value.errors()) == 1
    (error,) = err.value.errors()
    # The message names the offending setting (as the field, or in the text of a cross-field check) and why.
    assert field in error["loc"] or field in error["msg"]
    assert reason in error["msg"]


def test_a_rejected_update_leaves_the_session_working(demo_pipeline: Pipeline) -> None:
    clip = moving_clip(21)
    s = demo_pipeline.session(prompts=["a red fox"], **SMALL)
    reference = demo_pipeline.session(prompts=["a red fox"], **SMALL)
    s.push(clip[:9])
    reference.push(clip[:9])
    for bad in ({"height": 33}, {"steps": [100, 900]}, {"noise_scale": 2}, {"mode": "x"}, {"bogus": 1}):
        with pytest.raises((ValidationError, ValueError)):
            s.update(bad)
    assert s.settings == reference.settings
    assert torch.equal(
        torch.cat([s.push(clip[9:]), s.flush()]), torch.cat([reference.push(clip[9:]), reference.flush()])
    )


def test_live_updates_apply_from_the_next_chunk(demo_pipeline: Pipeline) -> None:
    s = demo_pipeline.session(prompts=["a red fox"], noise_controller=False, **SMALL)
    clip = moving_clip(18)
    s.push(clip[:9])
    s.update(SettingsUpdate(noise_scale=0.6, seed=11, steps=(650, 300)))
    s.push(clip[9:13])
    last = s.events[-1]
    assert last.noise_scale == pytest.approx(0.6) and last.timesteps == [500, 300]
    drained = s.update({"steps": [700]})  # fewer steps: fewer lanes, the stream restarts
    assert drained.shape[0] == 4  # the chunk still in its lanes came out first
    s.push(clip[13:18])
    assert s.events[-1].stream_start and s.events[-1].timesteps == [700]


def test_text_mode_streams_from_prompts_alone(demo_pipeline: Pipeline) -> None:
    s = demo_pipeline.session(prompts=["a red fox"], mode="text", **SMALL)
    out = s.generate(4)
    assert out.shape[0] == 5 + 4 * 3 - 4  # 4 chunks; stream batch: the last is still in its lanes
    assert s.settings.denoising_steps == (1000, 750)
    with pytest.raises(RuntimeError, match="text mode"):
        s.push(moving_clip(5))


@pytest.mark.slow
def test_two_thousand_chunks_keep_memory_flat_and_positions_bounded() -> None:
    pipe = Pipeline.demo()
    s = pipe.session(
        prompts=["a red fox"],
        height=16,
        width=16,
        steps=(700,),
        batching="none",
        encoder="taehv",
        decoder="taehv",
    )
    frame = moving_clip(5, 16, 16)
    rss = []
    with torch.inference_mode():
        s.push(frame)
        for i in range(2000):
            s.push(frame[:4])
            if i in (200, 1999):
                gc.collect()
                rss.append(_rss_mb())
    positions = {e.position for e in s.events}
    assert max(positions) < 50 and len(s.events) <= 2048
    assert s.frames_out == s.frames_in == 5 + 4 * 2000
    assert rss[1] - rss[0] < 25, f"memory grew {rss[1] - rss[0]:.1f} MB over 1800 chunks"


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
