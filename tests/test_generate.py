"""`wanstream generate` and its Python API on the tiny random-weight demo model (CPU, seconds)."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from wanstream import Pipeline
from wanstream.cli.main import main
from wanstream.cli.parsers import parse_prompt
from wanstream.engine.prompts import DEFAULT_PROMPT
from wanstream.engine.session import StreamSession
from wanstream.jobs.generate import (
    GenerateError,
    GenerateRequest,
    GenerationInterrupted,
    generate,
    plan,
)
from wanstream.jobs.generate.planning import DEMO_FRAMES, DEMO_SIZE
from wanstream.media.sample import sample_clip
from wanstream.media.video import VideoWriter, read_video
from wanstream.timeline import Timeline, load_timeline

from support.models_dir import write_tiny_models_dir

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("timeline-*.json"))
H, W, FPS, FRAMES = 64, 96, 16, 49
PROMPTS = ("a red fox in the snow", "a neon city at night", "a watercolor forest")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.demo()


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """49 frames at 96×64 (width×height), 16 fps: the sample clip's moving shapes, written with our own writer."""
    path = tmp_path_factory.mktemp("input") / "shapes.mp4"
    with VideoWriter(path, FPS) as out:
        out.write(sample_clip(FRAMES, H, W, FPS))
    return path


def timeline_v2(path: Path, *, manage_cache: bool | None = None, seed: int = 7, transition: int = 2) -> Path:
    """Three segments, switching at 1.0 s (frame 16) and 2.0 s (frame 32); the last blends in over chunks."""
    settings: dict = {"resolution": {"height": 480, "width": 832}, "seed": seed, "denoisingSteps": [700, 500]}
    if manage_cache is not None:
        settings["manageCache"] = manage_cache
    data = {
        "version": "2.1",
        "prompts": [
            {"startTime": 0, "endTime": 1.0, "prompts": [{"text": PROMPTS[0], "weight": 100}]},
            {"startTime": 1.0, "endTime": 2.0, "prompts": [{"text": PROMPTS[1], "weight": 100}]},
            {
                "startTime": 2.0,
                "endTime": 3.1,
                "prompts": [{"text": PROMPTS[2], "weight": 100}],
                "transitionSteps": transition,
                "temporalInterpolationMethod": "slerp",
            },
        ],
        "settings": settings,
    }
    path.write_text(json.dumps(data))
    return path


def decoded(path: Path) -> torch.Tensor:
    frames, _, _ = read_video(path)  # PyAV
    return frames


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def input_events(result) -> list:
    return [e for e in result.events if e.kind == "input"]


# ---------------------------------------------------------------------------------------------------------
# Video + timeline


def test_timeline_run_keeps_frames_and_size_and_switches_at_the_boundary_chunks(
    pipe: Pipeline, clip_path: Path, tmp_path: Path
) -> None:
    timeline = timeline_v2(tmp_path / "three.json")
    out = tmp_path / "out.mp4"
    progress = []
    result = generate(
        GenerateRequest(input=clip_path, timeline=timeline, output=out, vae="taehv"),
        pipe,
        on_progress=progress.append,
    )
    # One output frame per input frame, at the input's size (already a multiple of 16) and rate.
    frames = decoded(out)
    assert frames.shape == (FRAMES, H, W, 3)
    assert result.stats.frames == result.stats.input_frames == FRAMES
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert float(container.streams.video[0].average_rate) == FPS
    # The timeline's settings apply (seed 7, its steps); its 480×832 resolution does not (the input's does).
    assert result.plan.settings.seed == 7 and result.plan.settings.denoising_steps == (700, 500)
    assert any("832×480 is not used" in n for n in result.notes)

    # The engine's event log: each chunk is conditioned on the segment active at its last input frame.
    events = input_events(result)
    spans = [e.input_frames for e in events]
    assert spans[0] == (0, 5) and spans[-1][1] == FRAMES
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    prompt_of = {e.input_frames: e.prompt[0][0] for e in events}
    assert prompt_of[(9, 13)] == PROMPTS[0]
    assert prompt_of[(13, 17)] == PROMPTS[1]  # frame 16 (t = 1.0 s) is the first of segment 2
    assert prompt_of[(25, 29)] == PROMPTS[1]
    assert prompt_of[(29, 33)] == PROMPTS[2]  # frame 32 (t = 2.0 s)
    parsed = load_timeline(timeline)
    for e in events:
        last_time = (e.input_frames[1] - 1) / FPS
        assert e.prompt[0][0] == parsed.segment_at(last_time).prompts[0].text
    # Segment 3 blends in over 2 chunks (a transition, not a cut): the stream goes on.
    by_span = {e.input_frames: e for e in events}
    assert by_span[(29, 33)].transition_left == 1 and by_span[(33, 37)].transition_left == 0
    assert [e.stream_start for e in events].count(True) == 1

    # The result says where each switch happened.
    switches = [(s.segment, s.frame, s.chunk_frames, s.transition_chunks) for s in result.switches]
    assert switches == [(0, 0, (0, 5), 0), (1, 16, (13, 17), 0), (2, 32, (29, 33), 2)]
    assert all(e.output_frames is not None for e in events)
    assert events[-1].output_frames[1] == FRAMES
    # Progress: frames written, in order, ending at the total.
    assert [p.frames for p in progress] == sorted(p.frames for p in progress)
    assert progress[-1].frames == FRAMES and progress[-1].total == FRAMES


def test_cache_managed_switch_cuts_without_losing_frames(
    pipe: Pipeline, clip_path: Path, tmp_path: Path
) -> None:
    timeline = timeline_v2(tmp_path / "cut.json", manage_cache=True, transition=0)
    result = generate(
        GenerateRequest(input=clip_path, timeline=timeline, output=tmp_path / "cut.mp4", vae="taehv"), pipe
    )
    assert result.plan.settings.prompt_switch == "cut" and result.plan.settings.batching == "stream"
    assert decoded(tmp_path / "cut.mp4").shape[0] == FRAMES
    events = input_events(result)
    # A cut restarts the stream: the chunk holding the boundary frame is a new first chunk (5 frames).
    starts = [(e.input_frames, e.prompt[0][0]) for e in events if e.stream_start]
    assert starts == [((0, 5), PROMPTS[0]), ((13, 18), PROMPTS[1]), ((30, 35), PROMPTS[2])]
    covered = sorted(e.output_frames for e in events)
    assert covered[0][0] == 0 and covered[-1][1] == FRAMES
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))


def test_same_seed_reproduces_the_video_and_another_seed_does_not(
    pipe: Pipeline, clip_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The generated frames are compared bit for bit as they go into the encoder. libx264 itself is not
    # bit-reproducible on every CPU (on an AVX-512 VM about 1 encode in 4,000 of identical input gave another
    # bitstream), so the decoded files are compared within a fraction of a level.
    written: list[torch.Tensor] = []
    original = VideoWriter.write

    def capture(self: VideoWriter, frames: torch.Tensor) -> None:
        written.append(frames.clone())
        original(self, frames)

    monkeypatch.setattr(VideoWriter, "write", capture)

    def run(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        written.clear()
        request = GenerateRequest(
            input=clip_path, prompts=(PROMPTS[0],), output=tmp_path / name, seed=seed, vae="taehv", frames=21
        )
        generate(request, pipe)
        return torch.cat(written), decoded(tmp_path / name)

    (raw_a, a), (raw_b, b), (raw_c, c) = run("a.mp4", 5), run("b.mp4", 5), run("c.mp4", 6)
    assert raw_a.shape == a.shape == (21, H, W, 3)
    assert torch.equal(raw_a, raw_b)
    assert not torch.equal(raw_a, raw_c)
    assert (a.float() - b.float()).abs().mean() < 0.5
    assert (a.float() - c.float()).abs().mean() > 2.0


def test_weighted_prompt_blend(pipe: Pipeline, clip_path: Path, tmp_path: Path) -> None:
    prompts = (parse_prompt("a red fox:3"), parse_prompt("a neon city:1"))
    result = generate(
        GenerateRequest(
            input=clip_path, prompts=prompts, output=tmp_path / "blend.mp4", vae="taehv", frames=9
        ),
        pipe,
    )
    assert input_events(result)[0].prompt == (("a red fox", 0.75), ("a neon city", 0.25))


def test_prompt_weight_syntax() -> None:
    assert parse_prompt("a cat:2").weight == 2.0 and parse_prompt("a cat:2").text == "a cat"
    assert parse_prompt("style: watercolor").text == "style: watercolor"  # not a number: part of the text
    keep = parse_prompt("aspect 16:9:1")
    assert (keep.text, keep.weight) == ("aspect 16:9", 1.0)
    with pytest.raises(GenerateError, match="empty"):
        parse_prompt("   ")


# ---------------------------------------------------------------------------------------------------------
# Text mode


@pytest.mark.parametrize("frames", [1, 5, 6, 14])
def test_text_mode_makes_exactly_the_frames_asked_for(pipe: Pipeline, tmp_path: Path, frames: int) -> None:
    out = tmp_path / "text.mp4"
    result = generate(
        GenerateRequest(
            mode="text", prompts=(PROMPTS[1],), output=out, frames=frames, height=H, width=W, vae="taehv"
        ),
        pipe,
    )
    assert decoded(out).shape == (frames, H, W, 3)
    assert result.stats.frames == frames
    with av.open(str(out)) as container:
        assert float(container.streams.video[0].average_rate) == 16  # text mode: 16 fps
    assert result.plan.settings.denoising_steps == (1000, 750)  # the text-mode default


def test_text_mode_follows_the_timeline_in_output_frames(pipe: Pipeline, tmp_path: Path) -> None:
    timeline = timeline_v2(tmp_path / "three.json")
    result = generate(
        GenerateRequest(
            mode="text", timeline=timeline, output=tmp_path / "t.mp4", vae="taehv", steps=(1000,)
        ),
        pipe,
    )
    assert result.plan.source.frames == math.ceil(3.1 * 16)  # the timeline's length
    assert result.plan.settings.batching == "none"  # auto: one step → no lanes
    # Demo model: its small size instead of the timeline's 480×832, and it says so.
    assert (result.plan.settings.height, result.plan.settings.width) == DEMO_SIZE
    assert any("instead of the timeline's 832×480" in n for n in result.notes)
    assert [(s.segment, s.frame, s.chunk_frames) for s in result.switches] == [
        (0, 0, (0, 5)),
        (1, 16, (13, 17)),
        (2, 32, (29, 33)),
    ]
    assert decoded(tmp_path / "t.mp4").shape[0] == 50


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_timeline_drives_a_demo_run(
    pipe: Pipeline, clip_path: Path, tmp_path: Path, path: Path
) -> None:
    timeline = load_timeline(path)
    # Video mode over a real input: plans, with the timeline's settings.
    job = plan(GenerateRequest(input=clip_path, timeline=path, output=tmp_path / "v.mp4"), demo=True)
    assert job.settings.seed == timeline.settings.seed
    # A short run through every segment: text mode at 2 fps covers the whole timeline in a few chunks.
    result = generate(
        GenerateRequest(
            mode="text",
            timeline=path,
            output=tmp_path / "t.mp4",
            fps=2,
            height=H,
            width=W,
            vae="taehv",
            steps=(1000, 750),
        ),
        pipe,
    )
    assert result.stats.frames == math.ceil(timeline.duration * 2)
    assert [s.segment for s in result.switches] == list(range(len(timeline.segments)))
    texts = {e.prompt[0][0] for e in result.events if e.kind == "text"}
    assert texts == {s.prompts[0].text for s in timeline.segments}


# ---------------------------------------------------------------------------------------------------------
# Frame timing: variable frame rates and resampling


def write_with_times(path: Path, times_ms: list[int], height: int = H, width: int = W) -> torch.Tensor:
    images = sample_clip(len(times_ms), height, width).numpy()
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.height, video.width, video.pix_fmt = height, width, "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        for image, t in zip(images, times_ms):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(video.encode(frame))
        container.mux(video.encode())
    return torch.from_numpy(images)


def test_variable_frame_rate_switches_by_timestamp(pipe: Pipeline, tmp_path: Path) -> None:
    # Frames crowd together early on: frame 9 is the first at or after 1.0 s (index/fps would say frame 25).
    times = [0, 40, 80, 120, 160, 200, 300, 500, 900, 1000, 1100, 1200, 1300, 1400, 1500]
    path = tmp_path / "vfr.mp4"
    write_with_times(path, times)
    data = {
        "prompts": [
            {"startTime": 0, "endTime": 1, "prompts": [{"text": PROMPTS[0]}]},
            {"startTime": 1, "endTime": 2, "prompts": [{"text": PROMPTS[1]}]},
        ]
    }
    (tmp_path / "tl.json").write_text(json.dumps(data))
    result = generate(
        GenerateRequest(input=path, timeline=tmp_path / "tl.json", output=tmp_path / "o.mp4", vae="taehv"),
        pipe,
    )
    assert result.stats.frames == len(times)
    assert [(s.segment, s.frame) for s in result.switches] == [(0, 0), (1, 9)]
    assert result.switches[1].chunk_frames == (9, 13)
    assert any("variable frame rate" in n for n in result.notes)
    # --fps resamples onto a constant grid: the switch lands on tick 10 (1.0 s at 10 fps).
    result = generate(
        GenerateRequest(
            input=path, timeline=tmp_path / "tl.json", output=tmp_path / "c.mp4", vae="taehv", fps=10
        ),
        pipe,
    )
    assert result.stats.frames in (16, 17)  # ticks up to 1.5 s + one average frame
    assert [(s.segment, s.frame) for s in result.switches] == [(0, 0), (1, 10)]
    assert not any("variable frame rate" in n for n in result.notes)


def test_fps_resamples_the_input_by_timestamps(pipe: Pipeline, tmp_path: Path) -> None:
    path = tmp_path / "in30.mp4"
    with VideoWriter(path, 30) as out:
        out.write(sample_clip(30, H, W, 30))  # 1 s at 30 fps
    result = generate(
        GenerateRequest(input=path, prompts=("x",), output=tmp_path / "o.mp4", fps=16, vae="taehv"), pipe
    )
    assert result.stats.frames == 16
    with av.open(str(tmp_path / "o.mp4")) as container:
        assert float(container.streams.video[0].average_rate) == 16


# ---------------------------------------------------------------------------------------------------------
# Planning: resolution, settings, validation (no model involved)


def test_resolution_follows_the_input_rounded_to_16(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    with VideoWriter(path, 16) as out:
        out.write(sample_clip(3, 70, 100))
    job = plan(GenerateRequest(input=path, output=tmp_path / "o.mp4"))
    assert (job.settings.height, job.settings.width) == (64, 96)
    assert any("100×70 rounded to 96×64" in n for n in job.notes)
    # One side given: the other keeps the input's aspect ratio.
    job = plan(GenerateRequest(input=path, output=tmp_path / "o.mp4", height=128))
    assert (job.settings.height, job.settings.width) == (128, 176)
    job = plan(GenerateRequest(input=path, output=tmp_path / "o.mp4", height=32, width=48))
    assert (job.settings.height, job.settings.width) == (32, 48)
    with pytest.raises(GenerateError, match=r"height \(--height\).*multiple of 16"):
        plan(GenerateRequest(input=path, output=tmp_path / "o.mp4", height=100, width=96))


def test_text_mode_resolution_and_the_built_in_clip(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    assert (plan(GenerateRequest(mode="text", prompts=("x",), output=out)).settings.height) == 480
    timeline = Timeline.constant(["x"])
    job = plan(GenerateRequest(mode="text", timeline=timeline, output=out))
    assert (job.settings.height, job.settings.width) == (480, 832)
    # The built-in clip: full size with the real model, small and short with the demo model.
    real = plan(GenerateRequest(output=out))
    assert real.source.kind == "sample" and (real.settings.height, real.source.frames) == (480, 81)
    demo = plan(GenerateRequest(output=out), demo=True)
    assert (demo.settings.height, demo.settings.width, demo.source.frames) == (*DEMO_SIZE, DEMO_FRAMES)
    assert any("demo model: small defaults" in n for n in demo.notes)
    # With no input video to follow, a timeline's resolution applies (rounded), except with the demo model.
    sized = tmp_path / "sized.json"
    sized.write_text(
        json.dumps(
            {
                "prompts": [{"startTime": 0, "endTime": 1, "prompts": [{"text": "x"}]}],
                "settings": {"resolution": {"height": 250, "width": 450}},
            }
        )
    )
    for mode in ("video", "text"):
        job = plan(GenerateRequest(mode=mode, timeline=sized, output=out))
        assert (job.settings.height, job.settings.width) == (256, 448), mode
        assert any("450×250 rounded to 448×256" in n for n in job.notes)
        job = plan(GenerateRequest(mode=mode, timeline=sized, output=out), demo=True)
        assert (job.settings.height, job.settings.width) == DEMO_SIZE


def test_without_a_timeline_or_prompts_the_products_default_prompt_applies(tmp_path: Path) -> None:
    """One default prompt for the product: a generate job shows what a live stream started bare shows."""
    job = plan(GenerateRequest(output=tmp_path / "o.mp4"))
    assert [[p.text for p in s.prompts] for s in job.timeline.segments] == [[DEFAULT_PROMPT]]
    assert any("no prompt given: using the default prompt" in n for n in job.notes)


def test_text_mode_with_a_first_step_below_1000_is_planned_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    low = plan(GenerateRequest(mode="text", prompts=("x",), output=out, steps=(700, 500)))
    assert low.settings.steps == (700, 500)
    assert [n for n in low.notes if "pure noise" in n] == [
        "text mode starts from pure noise: a first step of 700 (below 1000) gives washed-out video; "
        "try --steps 1000,750"
    ]
    assert not any(
        "pure noise" in n for n in plan(GenerateRequest(mode="text", prompts=("x",), output=out)).notes
    )


def test_settings_precedence_command_line_then_timeline_then_defaults(tmp_path: Path) -> None:
    timeline = timeline_v2(tmp_path / "t.json", manage_cache=True, seed=11)
    out = tmp_path / "o.mp4"
    job = plan(GenerateRequest(timeline=timeline, output=out))
    assert (job.settings.seed, job.settings.steps, job.settings.prompt_switch) == (11, (700, 500), "cut")
    job = plan(GenerateRequest(timeline=timeline, output=out, seed=3, steps=(600,), noise_scale=0.5))
    assert (job.settings.seed, job.settings.steps, job.settings.noise_scale) == (3, (600,), 0.5)
    assert job.settings.batching == "none"  # auto, one step
    assert plan(GenerateRequest(output=out, batching="none")).settings.batching == "none"
    assert plan(GenerateRequest(output=out, vae="taehv")).settings.encoder == "taehv"
    with pytest.raises(GenerateError, match=r"steps \(--steps\).*descending"):
        plan(GenerateRequest(output=out, steps=(500, 700)))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        (
            '{"prompts": [{"startTime": 2, "endTime": 1, "prompts": [{"text": "x"}]}]}',
            r"prompts\[0\]\.endTime",
        ),
        ('{"prompts": [{"startTime": 0, "endTime": 1, "prompts": []}]}', r"prompts\[0\]\.prompts"),
        ('{"prompts": [{"startTime": 0, "endTime": 1, "prompts": [{"text": "x", "weight": -1}]}]}', "weight"),
    ],
)
def test_malformed_timelines_are_rejected_before_anything_is_written(
    tmp_path: Path, clip_path: Path, content: str, expected: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "out" / "o.mp4"
    with pytest.raises(GenerateError, match=expected) as err:
        plan(GenerateRequest(input=clip_path, timeline=bad, output=out))
    assert str(bad) in str(err.value)
    assert not out.parent.exists()


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "folder"])
def test_bad_input_videos_are_rejected_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "in.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 20)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(GenerateError) as err:
        plan(GenerateRequest(input=path, prompts=("x",), output=tmp_path / "o.mp4"))
    assert str(path) in str(err.value)
    assert not (tmp_path / "o.mp4").exists()


def test_a_truncated_input_is_processed_as_far_as_it_decodes(
    pipe: Pipeline, clip_path: Path, tmp_path: Path
) -> None:
    data = clip_path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])  # the index survives (faststart), the last frames do not
    result = generate(
        GenerateRequest(input=cut, prompts=("x",), output=tmp_path / "o.mp4", vae="taehv"), pipe
    )
    assert 0 < result.stats.frames < FRAMES
    assert decoded(tmp_path / "o.mp4").shape[0] == result.stats.frames == result.stats.input_frames
    assert any("truncated" in n for n in result.notes)


def test_bad_outputs_and_conflicts(tmp_path: Path, clip_path: Path) -> None:
    with pytest.raises(GenerateError, match="is a folder"):
        plan(GenerateRequest(output=tmp_path))
    with pytest.raises(GenerateError, match="is the input video"):
        plan(GenerateRequest(input=clip_path, output=clip_path))
    with pytest.raises(GenerateError, match=r"\.mp4"):
        plan(GenerateRequest(output=tmp_path / "o.mkv"))
    with pytest.raises(GenerateError, match="drop the input video"):
        plan(GenerateRequest(input=clip_path, mode="text", output=tmp_path / "o.mp4"))
    with pytest.raises(GenerateError, match="not both"):
        plan(GenerateRequest(prompts=("x",), timeline=Timeline.constant(["y"]), output=tmp_path / "o.mp4"))


def test_audio_is_dropped_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "with_audio.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=16)
        video.height, video.width, video.pix_fmt = H, W, "yuv420p"
        audio = container.add_stream("aac", rate=44100, layout="mono")
        for i, image in enumerate(sample_clip(4, H, W).numpy()):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        for k in range(8):
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 44100, k * 1024
            container.mux(audio.encode(sound))
        container.mux(video.encode())
        container.mux(audio.encode())
    job = plan(GenerateRequest(input=path, output=tmp_path / "o.mp4"))
    assert any("audio track is dropped" in n for n in job.notes)


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_keeps_a_valid_partial_mp4(pipe: Pipeline, clip_path: Path, tmp_path: Path) -> None:
    out, stats = tmp_path / "partial.mp4", tmp_path / "stats.json"

    def interrupt_after_two_chunks(p) -> None:
        if p.frames >= 9:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as err:
        generate(
            GenerateRequest(input=clip_path, prompts=("x",), output=out, vae="taehv", stats_json=stats),
            pipe,
            on_progress=interrupt_after_two_chunks,
        )
    assert isinstance(err.value, KeyboardInterrupt)
    result = err.value.result
    assert result.interrupted and result.output == out
    assert 9 <= result.stats.frames < FRAMES
    assert decoded(out).shape == (result.stats.frames, H, W, 3)
    assert json.loads(stats.read_text())["interrupted"] is True
    assert leftovers(tmp_path) == []


def test_a_failure_mid_run_leaves_no_output(
    pipe: Pipeline, clip_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_push = StreamSession.push

    def failing_push(self, frames):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return real_push(self, frames)

    monkeypatch.setattr(StreamSession, "push", failing_push)
    out = tmp_path / "o.mp4"
    with pytest.raises(RuntimeError, match="simulated"):
        generate(GenerateRequest(input=clip_path, prompts=("x",), output=out, vae="taehv"), pipe)
    assert not out.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# The command line


def test_cli_demo_end_to_end(
    clip_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    timeline = timeline_v2(tmp_path / "three.json")
    out, stats = tmp_path / "out.mp4", tmp_path / "stats.json"
    argv = [
        "generate", str(clip_path), "--timeline", str(timeline), "-o", str(out), "--demo", "--vae", "taehv",
        "--seed", "9", "--stats-json", str(stats),
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err and "wanstream download" in captured.err
    assert "DEMO MODEL" in captured.out and "time to first frame" in captured.out
    assert "segment 2 from frame 16" in captured.out
    assert decoded(out).shape == (FRAMES, H, W, 3)
    data = json.loads(stats.read_text())
    assert data["frames"] == FRAMES and data["demo"] is True and data["settings"]["seed"] == 9
    for key in ("wall_s", "steady_state_fps", "chunk_latency_p50_ms", "chunk_latency_p90_ms"):
        assert data[key] > 0, key
    assert data["time_to_first_frame_s"] > 0
    assert [s["frame"] for s in data["prompt_switches"]] == [0, 16, 32]


def test_cli_readme_demo_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wanstream generate --demo -o outputs/demo.mp4` exactly: the built-in clip, demo defaults, Wan VAE."""
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--demo", "-o", "outputs/demo.mp4"]) == 0
    assert decoded(tmp_path / "outputs" / "demo.mp4").shape == (DEMO_FRAMES, *DEMO_SIZE, 3)


def test_cli_without_weights_or_demo_says_how_to_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    assert main(["generate", "-o", str(tmp_path / "o.mp4")]) == 1
    err = capsys.readouterr().err
    assert "wanstream download" in err and "--demo" in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--steps", "500,700"], "descending"),
        (["--steps", "7OO"], "comma-separated"),
        (["--height", "100", "--width", "96"], "multiple of 16"),
        (["--noise-scale", "1.5"], "--noise-scale"),
        (["--prompt", "a cat:2000"], "less than or equal to 1000"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_cli_bad_input_exits_2_before_loading_a_model(
    tmp_path: Path,
    clip_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    monkeypatch.setattr(Pipeline, "demo", classmethod(lambda cls, **kw: pytest.fail("model loaded")))
    out = tmp_path / "o.mp4"
    assert main(["generate", str(clip_path), "--demo", "-o", str(out), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_malformed_timeline_exits_2_naming_the_field(
    tmp_path: Path, clip_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompts": [{"startTime": 0, "endTime": 1, "prompts": [{"text": 3}]}]}')
    out = tmp_path / "o.mp4"
    assert main(["generate", str(clip_path), "--timeline", str(bad), "--demo", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prompts[0].prompts[0].text" in err and str(bad) in err
    assert not out.exists()


def test_cli_ctrl_c_exits_130_with_a_partial_mp4(
    tmp_path: Path,
    clip_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    calls = []
    real_push = StreamSession.push

    def push_then_ctrl_c(self, frames):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_push(self, frames)

    monkeypatch.setattr(StreamSession, "push", push_then_ctrl_c)
    out = tmp_path / "o.mp4"
    assert main(["generate", str(clip_path), "--demo", "--vae", "taehv", "-o", str(out)]) == 130
    captured = capsys.readouterr()
    assert "a valid MP4" in captured.err and "interrupted, partial" in captured.out
    frames = decoded(out)
    assert 5 <= frames.shape[0] < FRAMES and frames.shape[1:] == (H, W, 3)
    assert leftovers(tmp_path) == []


def test_cli_uses_downloaded_weights_when_present(
    tmp_path: Path, clip_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real loader path (a tiny models folder in the download layout); --demo only stands in when
    the weights are missing."""
    root = write_tiny_models_dir(tmp_path / "models")
    out, stats = tmp_path / "o.mp4", tmp_path / "s.json"
    argv = ["generate", str(clip_path), "--models-dir", str(root), "--vae", "taehv", "--frames", "13"]
    assert main([*argv, "--demo", "-o", str(out), "--stats-json", str(stats)]) == 0
    captured = capsys.readouterr()
    assert "RANDOM" not in captured.err + captured.out
    data = json.loads(stats.read_text())
    assert data["demo"] is False and data["model"].startswith("StreamDiffusionV2")
    assert data["frames"] == 13 and decoded(out).shape == (13, H, W, 3)

    (root / "Autoencoders" / "taew2_1.pth").unlink()  # --vae taehv without TAEHV: say how to get it
    assert main([*argv, "-o", str(tmp_path / "o2.mp4")]) == 1
    assert "--with-taehv" in capsys.readouterr().err
    assert not (tmp_path / "o2.mp4").exists()


@pytest.mark.parametrize("free_gib, code", [(0.001, 1), (100.0, 0)])
def test_cli_estimates_refuse_a_job_that_would_not_fit_before_any_frame(
    clip_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    free_gib: float,
    code: int,
) -> None:
    """With a (fake) measured row for this (fake) GPU and (fake) free memory: refused up front, saying what
    to lower, and nothing written; with room, the estimate is shown and the job runs."""
    from wanstream.engine import estimate

    row = estimate.Row(
        gpu="Fake GPU", height=H, width=W, steps=1, codecs="taehv", batching="none", precision="bf16",
        text_encoder="gpu", peak_gib=6.0, models_gib=1.0, fps=50.0,
    )  # fmt: skip
    real = estimate.preflight
    fake = lambda c, s, **kw: real(c, s, rows=[row], gpu="Fake GPU", free_bytes=int(free_gib * 2**30))  # noqa: E731
    monkeypatch.setattr(estimate, "preflight", fake)
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    out = tmp_path / "out.mp4"
    argv = [
        "generate",
        str(clip_path),
        "--prompt",
        "a fox",
        "-o",
        str(out),
        "--demo",
        "--vae",
        "taehv",
        "--steps",
        "700",
    ]
    assert main(argv) == code
    err = capsys.readouterr().err
    if code:
        assert "would not fit" in err and "a smaller size" in err and "estimate" in err and not out.exists()
    else:
        assert "FPS" in err and "an estimate" in err and out.exists()


def test_loras_on_a_ring_are_refused_with_the_rings_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wanstream.cli.main import main
    from wanstream.engine.settings import RING_LORA_PROBLEM

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not read: the ring refuses LoRAs before any file is opened")
    argv = ["generate", "--demo", "--prompt", "a cat", "--lora", str(lora), "--gpus", "2", "--device", "cpu"]
    assert main([*argv, "-o", str(tmp_path / "o.mp4")]) == 2
    assert RING_LORA_PROBLEM in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
