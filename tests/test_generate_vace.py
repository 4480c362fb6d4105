"""`wanstream generate` with VACE on the tiny demo model: control video + masks, references, first/last frame,
scale (timelines included), and bad inputs rejected before anything is written (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wanstream import Pipeline
from wanstream.cli.main import main
from wanstream.engine.settings import RING_CONDITIONING_PROBLEM
from wanstream.jobs.generate import GenerateRequest, GenerateResult, generate, plan
from wanstream.media.sample import sample_clip
from wanstream.media.video import VideoWriter, read_video
from wanstream.weights.store import MissingWeightsError

from support.clips import write_png
from support.models_dir import write_tiny_models_dir

H, W, FPS, FRAMES = 64, 96, 16, 21  # 21 frames = 5 chunks (5 + 4 × 4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.demo()


def write_video(path: Path, frames: torch.Tensor, fps: float = FPS) -> Path:
    with VideoWriter(path, fps) as out:
        out.write(frames)
    return path


def box_masks(t: int, height: int = H, width: int = W) -> torch.Tensor:
    """White (generate) in the middle, black (keep) around it, as RGB video frames."""
    m = torch.zeros(t, height, width, 3, dtype=torch.uint8)
    m[:, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return m


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vace-media")
    gen = torch.Generator().manual_seed(3)
    colour = box_masks(FRAMES)
    colour[..., 1] = 0  # white box → magenta: not a mask
    return {
        "control": write_video(d / "control.mp4", sample_clip(FRAMES, H, W, FPS)),
        "short_control": write_video(d / "short.mp4", sample_clip(13, H, W, FPS)),
        "input": write_video(d / "input.mp4", sample_clip(FRAMES, 48, 80, FPS).flip(0)),
        "mask": write_video(d / "mask.mp4", box_masks(FRAMES)),
        "mask_small": write_video(d / "mask-small.mp4", box_masks(FRAMES, 32, 48)),
        "mask_short": write_video(d / "mask-short.mp4", box_masks(9)),
        "mask_colour": write_video(d / "mask-colour.mp4", colour),
        "ref": write_png(d / "ref.png", (torch.rand(40, 56, 3, generator=gen) * 255).to(torch.uint8)),
        "first": write_png(d / "first.png", (torch.rand(64, 96, 3, generator=gen) * 255).to(torch.uint8)),
        "broken": _write(d / "broken.png", b"\x89PNG\r\n\x1a\n not really"),
        "tiny": write_video(d / "tiny.mp4", sample_clip(5, H, W, FPS)),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def frames_of(path: Path) -> torch.Tensor:
    return read_video(path)[0]


def no_vace(pipe: Pipeline, out: Path) -> torch.Tensor:
    """The same job without VACE: text mode at the control video's size, rate and length."""
    request = GenerateRequest(
        mode="text",
        frames=FRAMES,
        height=H,
        width=W,
        fps=FPS,
        batching="none",
        prompts=("a fox",),
        output=out,
    )
    generate(request, pipe)
    return frames_of(out)


def with_vace(pipe: Pipeline, out: Path, **fields) -> GenerateResult:
    return generate(GenerateRequest(prompts=("a fox",), output=out, **fields), pipe)


# ---------------------------------------------------------------------------------------------------------
# The command line, end to end


def test_cli_control_mask_and_reference(
    media: dict[str, Path],
    pipe: Pipeline,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    out, stats = tmp_path / "vace.mp4", tmp_path / "stats.json"
    argv = [
        "generate", "--demo", "--control-video", str(media["control"]), "--mask-video", str(media["mask"]),
        "--ref-image", str(media["ref"]), "--prompt", "a fox", "-o", str(out), "--stats-json", str(stats),
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert (
        "vace:     control" in captured.err and "vace: conditioning ×5; scale 1 from chunk 0" in captured.out
    )
    # The control video plays the input's part: its length, size and rate; text mode, chunk by chunk.
    frames = frames_of(out)
    assert frames.shape == (FRAMES, H, W, 3)
    data = json.loads(stats.read_text())
    assert data["mode"] == "text" and data["settings"]["batching"] == "none" and data["fps"] == FPS
    chunks = data["vace"]["chunks"]
    assert [c["control_frames"] for c in chunks] == [5, 4, 4, 4, 4]
    assert {c["mode"] for c in chunks} == {"conditioning"} and {c["references"] for c in chunks} == {1}
    # Each chunk's context: the reference latent + the chunk's latents (2 on the first chunk, then 1).
    assert [c["context_frames"] for c in chunks] == [3, 2, 2, 2, 2]
    assert data["vace"]["mask_video"] == str(media["mask"])
    # VACE changes the video.
    plain = no_vace(pipe, tmp_path / "plain.mp4")
    assert (frames.float() - plain.float()).abs().mean() > 5


def test_scale_zero_reproduces_the_run_without_vace(
    pipe: Pipeline, media: dict[str, Path], tmp_path: Path
) -> None:
    # Corrected numerics: scale 0 adds exact zeros, bit for bit the run without VACE — the frames the engine
    # hands the MP4 writer (the H.264 files are not byte-stable across runs: x264's mbtree, docs/generate.md).
    # Scope's numerics keep its float32 time sinusoid whenever VACE is on: the frames the encoder gets
    # differ from the run without VACE by rounding only (≤ 1 of 255).
    written: dict[str, list[torch.Tensor]] = {"plain": [], "zero": [], "scope": []}
    real_write = VideoWriter.write

    def capture(key: str):
        def write(self, frames):
            written[key].append(frames.clone())
            return real_write(self, frames)

        return write

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VideoWriter, "write", capture("plain"))
        no_vace(pipe, tmp_path / "plain2.mp4")
        mp.setattr(VideoWriter, "write", capture("zero"))
        zero = with_vace(
            pipe, tmp_path / "zero.mp4", control_video=media["control"], vace_scale=0, vace_corrected=True
        )
        mp.setattr(VideoWriter, "write", capture("scope"))
        with_vace(pipe, tmp_path / "scope.mp4", control_video=media["control"], vace_scale=0)
    assert [c.scale for c in zero.vace] == [0.0] * 5
    a, b = torch.cat(written["plain"]).int(), torch.cat(written["scope"]).int()
    assert a.shape == b.shape == (FRAMES, H, W, 3)
    assert torch.equal(torch.cat(written["zero"]).int(), a)
    assert (a - b).abs().max() <= 1
    # And scale 1 is far from both.
    one = with_vace(pipe, tmp_path / "one.mp4", control_video=media["control"], vace_corrected=True)
    assert one.vace[0].scale == 1.0
    assert (frames_of(tmp_path / "one.mp4").float() - a.float()).abs().mean() > 5


def test_video_mode_control_follows_the_input_chunks(
    pipe: Pipeline, media: dict[str, Path], tmp_path: Path
) -> None:
    """Input video + a shorter control video + first and last frame: control frames line up with the input's
    chunks (resized to the output size), chunks after the control's end run without it, the first chunk
    starts from the first-frame image and the last one ends on the last-frame image."""
    result = with_vace(
        pipe,
        tmp_path / "v.mp4",
        input=media["input"],
        control_video=media["short_control"],
        first_frame=media["first"],
        last_frame=media["ref"],
        ref_images=(media["ref"],),
        ref_once=True,
    )
    assert result.plan.settings.mode == "video" and result.plan.settings.batching == "none"
    assert frames_of(tmp_path / "v.mp4").shape == (FRAMES, 48, 80, 3)
    rows = [(c.mode, c.control_frames, c.references) for c in result.vace]
    assert rows == [
        (
            "extension:firstframe",
            5,
            1,
        ),  # the first chunk: image + its control frames + the one-shot reference
        ("conditioning", 4, 0),
        ("conditioning", 4, 0),  # 13 control frames: 5 + 4 + 4
        ("none", 0, 0),
        ("extension:lastframe", 0, 0),
    ]
    assert [e.chunk for e in result.events if e.kind == "input"] == [c.chunk for c in result.vace]


def test_a_partial_last_chunk_pads_the_control_like_the_input(
    pipe: Pipeline, media: dict[str, Path], tmp_path: Path
) -> None:
    """19 input frames = 4 whole chunks + 2 frames: the last chunk's 2 control frames are padded to 4, and
    its padding is trimmed from the output."""
    result = with_vace(pipe, tmp_path / "p.mp4", control_video=media["control"], frames=19)
    assert [c.control_frames for c in result.vace] == [5, 4, 4, 4, 4]
    assert result.stats.frames == 19 and frames_of(tmp_path / "p.mp4").shape[0] == 19


# ---------------------------------------------------------------------------------------------------------
# Timelines: vace_context_scale per segment


def test_timeline_scale_changes_show_in_the_event_log(
    pipe: Pipeline, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeline = tmp_path / "t.json"
    timeline.write_text(
        json.dumps(
            {
                "version": "2.1",
                "prompts": [
                    {"startTime": 0, "endTime": 0.5, "prompts": [{"text": "a fox", "weight": 1}]},
                    {
                        "startTime": 0.5,
                        "endTime": 1.0,
                        "prompts": [{"text": "a wolf", "weight": 1}],
                        "vace_context_scale": 0.25,
                    },
                    {"startTime": 1.0, "endTime": 1.4, "prompts": [{"text": "a bear", "weight": 1}]},
                ],
                "settings": {"vace_context_scale": 1.5},
            }
        )
    )
    result = generate(
        GenerateRequest(control_video=media["control"], timeline=timeline, output=tmp_path / "t.mp4"), pipe
    )
    # Frames 8 (0.5 s) and 16 (1.0 s) open segments 2 and 3: chunks 1 (frames 5-8) and 3 (frames 13-16).
    assert [s.chunk for s in result.switches] == [0, 1, 3]
    assert [c.scale for c in result.vace] == [1.5, 0.25, 0.25, 1.5, 1.5]
    # The command line's --vace-scale replaces the timeline's base value, not a segment's own.
    out, stats = tmp_path / "t2.mp4", tmp_path / "t2.json"
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    argv = [
        "generate", "--demo", "--control-video", str(media["control"]), "--timeline", str(timeline),
        "--vace-scale", "2", "-o", str(out), "--stats-json", str(stats),
    ]  # fmt: skip
    assert main(argv) == 0
    chunks = json.loads(stats.read_text())["vace"]["chunks"]
    assert [(c["chunk"], c["scale"]) for c in chunks] == [(0, 2.0), (1, 0.25), (2, 0.25), (3, 2.0), (4, 2.0)]


def test_a_timeline_scale_without_vace_inputs_is_noted(tmp_path: Path) -> None:
    timeline = tmp_path / "t.json"
    timeline.write_text(
        json.dumps(
            {
                "prompts": [{"startTime": 0, "endTime": 1, "prompts": [{"text": "a"}]}],
                "settings": {"vaceContextScale": 1},
            }
        )
    )
    job = plan(GenerateRequest(mode="text", timeline=timeline, output=tmp_path / "o.mp4"), demo=True)
    assert job.vace is None and any("vace_context_scale is not used" in n for n in job.notes)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: exit 2 before a model loads or a file is written


BAD = [
    (["--control-video", "{control}", "--mask-video", "{mask_small}"], "mask size mismatch"),
    (["--control-video", "{control}", "--mask-video", "{mask_colour}"], "is in colour"),
    (["--control-video", "{control}", "--mask-video", "{mask_short}"], "lasts 0.562 s"),
    (["--mask-video", "{mask}"], "--mask-video needs --control-video"),
    (["--control-video", "{broken}"], "--control-video:"),
    (["--ref-image", "{broken}"], "cannot read this image"),
    (["--ref-image", "{control}.missing.png"], "image not found"),
    (["--first-frame", "{broken}"], "--first-frame:"),
    (["--ref-image", "{ref}", "--vace-scale", "2.5"], "--vace-scale"),
    (["--ref-image", "{ref}", "--batching", "stream"], "--batching stream cannot be used with VACE"),
    (["--ref-image", "{ref}", "--gpus", "2", "--device", "cpu"], RING_CONDITIONING_PROBLEM),
    (["--vace-scale", "0.5"], "need a VACE input"),
    (["--ref-once"], "need a VACE input"),
    (["--control-video", "{tiny}", "--first-frame", "{ref}", "--last-frame", "{ref}"], "at least two chunks"),
    (["--ref-image", "{ref}"] * 5, "at most 4 reference images"),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_vace_input_exits_2_before_any_work(
    media: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))
    monkeypatch.setattr(Pipeline, "demo", classmethod(lambda cls, **kw: pytest.fail("model loaded")))
    names = {k: str(v) for k, v in media.items()}
    out = tmp_path / "o.mp4"
    argv = ["generate", "--demo", "-o", str(out), *(a.format(**names) for a in args)]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no partial file


def test_a_mask_video_that_ends_early_fails_the_run_without_output(
    pipe: Pipeline, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mask video whose length the container does not announce is checked as it plays: the run stops,
    naming it, and leaves no output file."""
    from wanstream.jobs.generate import vace

    monkeypatch.setattr(vace, "_duration", lambda info: None)
    with pytest.raises(Exception, match="ended before the control video"):
        with_vace(pipe, tmp_path / "o.mp4", control_video=media["control"], mask_video=media["mask_short"])
    assert list(tmp_path.iterdir()) == []


def test_vace_without_a_vace_module_is_a_clear_error(media: dict[str, Path], tmp_path: Path) -> None:
    bare = Pipeline.demo()
    bare.components.vace = None
    with pytest.raises(ValueError, match="no VACE module"):
        with_vace(bare, tmp_path / "o.mp4", ref_images=(media["ref"],))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Real weights: the VACE file is loaded when VACE inputs are given, and named when missing


def test_cli_loads_the_vace_file_and_names_it_when_missing(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_tiny_models_dir(tmp_path / "models", taehv=False, vace=True)
    out, stats = tmp_path / "o.mp4", tmp_path / "s.json"
    argv = ["generate", "--models-dir", str(root), "--ref-image", str(media["ref"]), "--mode", "text"]
    argv += ["--frames", "9", "--height", "32", "--width", "48"]
    assert main([*argv, "-o", str(out), "--stats-json", str(stats)]) == 0
    data = json.loads(stats.read_text())
    assert data["demo"] is False and [c["mode"] for c in data["vace"]["chunks"]] == ["r2v"] * 2
    # Python: "auto" loads it when present, False never does.
    assert Pipeline.load(root, device="cpu", vace="auto").components.vace is not None
    assert Pipeline.load(root, device="cpu").components.vace is None

    (root / "WanVideo_comfy" / "Wan2_1-VACE_module_1_3B_bf16.safetensors").unlink()
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "o2.mp4")]) == 1
    err = capsys.readouterr().err
    assert "needs the VACE module" in err and "--with-vace" in err
    assert not (tmp_path / "o2.mp4").exists()
    assert Pipeline.load(root, device="cpu", vace="auto").components.vace is None
    with pytest.raises(MissingWeightsError, match="--with-vace"):
        Pipeline.load(root, device="cpu", vace=True)
