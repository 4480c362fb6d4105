"""Video I/O: round trips, timestamps, interrupted and failed writes, bad inputs, resizing, size rounding."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from wanstream.media.sample import sample_clip
from wanstream.media.video import (
    VideoError,
    VideoReader,
    VideoWriter,
    _interrupts_deferred,
    probe_video,
    read_video,
    resize_frames,
    round_size,
)

H, W = 64, 96


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return sample_clip(20, H, W)


def mean_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def encode(
    path: Path, images: np.ndarray, pts: list[int], time_base: Fraction, fmt: str | None = None, **stream
) -> None:
    """Write frames with exactly these timestamps, bypassing our writer (to make unusual inputs)."""
    container = av.open(str(path), "w", format=fmt)
    video = container.add_stream("libx264", rate=stream.pop("rate", 16))
    video.height, video.width = images.shape[1:3]
    video.pix_fmt = stream.pop("pix_fmt", "yuv420p")
    video.codec_context.time_base = time_base
    if "rotation" in stream:
        video.set_display_rotation(stream.pop("rotation"))
    for image, p in zip(images, pts, strict=True):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = p, time_base
        container.mux(video.encode(frame))
    container.mux(video.encode())
    container.close()


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------------------
# Round trip


def test_write_read_round_trip(tmp_path: Path, clip: torch.Tensor) -> None:
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps=16) as writer:
        writer.write(clip[:8])  # uint8
        writer.write(clip[8:19].float() / 255)  # float in [0, 1]
        writer.write(clip[19])  # one [H, W, 3] frame
    assert writer.frames_written == 20 and writer.size == (H, W)
    assert leftovers(tmp_path, {"out.mp4"}) == []  # no temp file left behind

    frames, times, info = read_video(out)
    assert frames.shape == (20, H, W, 3) and frames.dtype == torch.uint8
    assert (info.width, info.height, info.fps, info.frame_count) == (W, H, 16.0, 20)
    assert info.duration == pytest.approx(20 / 16)
    assert not info.has_audio and info.codec == "h264" and info.rotation == 0
    assert times.tolist() == [i / 16 for i in range(20)]
    assert mean_abs_error(frames, clip) < 8  # CRF 18 on a tiny textured clip

    # What players need: H.264 in yuv420p, tagged BT.709 (the matrix we converted with).
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.codec_context.colorspace == 1  # AVCOL_SPC_BT709


def test_reader_chunks_and_probe(tmp_path: Path, clip: torch.Tensor) -> None:
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps=16) as writer:
        writer.write(clip)
    everything, all_times, _ = read_video(out)
    with VideoReader(out) as reader:
        pieces = list(reader.chunks(8))
    assert [p[0].shape[0] for p in pieces] == [8, 8, 4]
    assert torch.equal(torch.cat([p[0] for p in pieces]), everything)
    assert torch.equal(torch.cat([p[1] for p in pieces]), all_times)
    with VideoReader(out) as reader:
        first, time = next(iter(reader))
        assert time == 0.0 and torch.equal(first, everything[0])
    assert read_video(out, max_frames=5)[0].shape[0] == 5
    assert probe_video(out).frame_count == 20


def test_non_integer_frame_rate(tmp_path: Path, clip: torch.Tensor) -> None:
    out = tmp_path / "ntsc.mp4"
    with VideoWriter(out, fps=30000 / 1001) as writer:
        writer.write(clip[:6])
    assert writer.rate == Fraction(30000, 1001)
    assert VideoWriter(tmp_path / "np.mp4", fps=np.float32(12.5)).rate == Fraction(25, 2)  # numpy numbers too
    _, times, info = read_video(out)
    assert info.fps == pytest.approx(29.97, abs=1e-3)
    assert times.tolist() == pytest.approx([i * 1001 / 30000 for i in range(6)], abs=1e-9)


def test_variable_frame_rate_timestamps(tmp_path: Path, clip: torch.Tensor) -> None:
    # Irregular presentation times, starting late (a stream start offset): times count from the first frame.
    pts_ms = [500, 540, 600, 610, 750, 900, 920, 1200]
    expected = [(p - 500) / 1000 for p in pts_ms]
    for fmt, suffix in (("mp4", ".mp4"), ("matroska", ".mkv")):
        path = tmp_path / f"vfr{suffix}"
        encode(path, clip[:8].numpy(), pts_ms, Fraction(1, 1000), fmt=fmt, rate=25)
        frames, times, info = read_video(path)
        assert frames.shape[0] == 8
        assert times.tolist() == pytest.approx(expected, abs=1e-9), fmt
        assert info.fps > 0
        assert mean_abs_error(frames, clip[:8]) < 8


# ---------------------------------------------------------------------------------------------------------
# Interrupted and failed writes


def test_interrupt_then_close_keeps_the_frames_so_far(tmp_path: Path, clip: torch.Tensor) -> None:
    out = tmp_path / "out.mp4"
    writer = VideoWriter(out, fps=16)
    try:
        for i in range(5):
            if i == 3:
                raise KeyboardInterrupt  # Ctrl-C between two chunks
            writer.write(clip[4 * i : 4 * i + 4])
    except KeyboardInterrupt:
        assert not out.exists()  # nothing at the final path until close()
        assert writer.close() == out
    frames, times, _ = read_video(out)
    assert frames.shape[0] == 12
    assert times.tolist() == [i / 16 for i in range(12)]
    assert mean_abs_error(frames, clip[:12]) < 8
    assert leftovers(tmp_path, {"out.mp4"}) == []


def test_interrupt_inside_with_keeps_the_frames_so_far(tmp_path: Path, clip: torch.Tensor) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt), VideoWriter(out, fps=16) as writer:
        writer.write(clip[:5])
        raise KeyboardInterrupt
    assert read_video(out)[0].shape[0] == 5


@pytest.fixture
def plain_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handling, whatever earlier tests left behind: the default handler installed and SIGINT
    not blocked in this thread. In a full run beside a CPU hog this test once saw no KeyboardInterrupt at all: its
    signal stayed pending, never handled — exactly what a SIGINT blocked in the main thread gives (reproduced
    with pthread_sigmask). Which earlier test leaves it blocked under load is not found yet; multiprocessing's
    resource tracker blocks SIGINT around its start, for one."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = (
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if hasattr(signal, "pthread_sigmask")
        else None
    )
    yield
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signal.signal(signal.SIGINT, handler)


def test_ctrl_c_is_held_back_until_a_frame_is_encoded(plain_sigint: None) -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), _interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        steps.append("finished the critical section")
    assert steps == ["finished the critical section"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_failed_write_leaves_no_file(tmp_path: Path, clip: torch.Tensor) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, fps=16) as writer:
        writer.write(clip[:4])
        raise RuntimeError("boom")
    assert leftovers(tmp_path, set()) == []

    # A bad frame mid-way is a failure too; an older file at the path is left as it was.
    out.write_bytes(b"previous output")
    with pytest.raises(ValueError, match="frame size changed"), VideoWriter(out, fps=16) as writer:
        writer.write(clip[:4])
        writer.write(torch.zeros(2, H + 16, W, 3, dtype=torch.uint8))
    assert out.read_bytes() == b"previous output"
    assert leftovers(tmp_path, {"out.mp4"}) == []


def test_close_without_frames_writes_nothing(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "out.mp4", fps=16)
    assert writer.close() is None
    assert leftovers(tmp_path, set()) == []
    with VideoWriter(tmp_path / "out.mp4", fps=16):
        pass
    assert leftovers(tmp_path, set()) == []


def test_writer_rejects_bad_arguments_and_frames(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4", fps=16)
    with pytest.raises(VideoError, match="is a folder"):
        VideoWriter(tmp_path, fps=16)
    for fps in (0, -1, float("nan"), float("inf"), "16"):
        with pytest.raises(ValueError, match="fps"):
            VideoWriter(tmp_path / "out.mp4", fps=fps)
    writer = VideoWriter(tmp_path / "out.mp4", fps=16)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        writer.write(torch.zeros(H, W, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        writer.write(torch.zeros(1, H, W, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        writer.write(torch.zeros(1, H, W, 3, dtype=torch.int32))
    writer.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        writer.write(torch.zeros(1, H, W, 3, dtype=torch.uint8))
    assert leftovers(tmp_path, set()) == []


# ---------------------------------------------------------------------------------------------------------
# Inputs of every kind


def test_unreadable_inputs_give_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    empty = tmp_path / "empty.mp4"
    empty.touch()
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a video\n" * 20)
    audio_only = tmp_path / "voice.m4a"
    with av.open(str(audio_only), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100, layout="mono")
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path: "not a file",
        empty: "the file is empty",
        garbage: "not a readable video file",
        text: "a text file, not a video|not a readable video file",  # depends on FFmpeg's probe
        audio_only: r"no video stream in the file \(found: audio\)",
    }
    for path, message in cases.items():
        with pytest.raises(VideoError, match=message) as err:
            read_video(path)
        assert str(path) in str(err.value)


def test_audio_is_ignored_but_reported(tmp_path: Path, clip: torch.Tensor) -> None:
    path = tmp_path / "with_audio.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=16)
        video.height, video.width, video.pix_fmt = H, W, "yuv420p"
        audio = container.add_stream("aac", rate=44100, layout="mono")
        for i, image in enumerate(clip[:8].numpy()):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        for k in range(12):
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 44100, k * 1024
            container.mux(audio.encode(sound))
        container.mux(video.encode())
        container.mux(audio.encode())
    frames, times, info = read_video(path)
    assert info.has_audio
    assert frames.shape == (8, H, W, 3) and times.tolist() == [i / 16 for i in range(8)]


def test_odd_sizes(tmp_path: Path) -> None:
    odd = sample_clip(3, 33, 47)
    # Reading: 4:4:4 H.264 can have odd sides.
    path = tmp_path / "odd444.mp4"
    encode(path, odd.numpy(), [0, 1, 2], Fraction(1, 16), pix_fmt="yuv444p")
    frames, _, info = read_video(path)
    assert (info.height, info.width) == (33, 47) and frames.shape == (3, 33, 47, 3)
    assert mean_abs_error(frames, odd) < 8
    # Writing: yuv420p needs even sides, so the last row and column are repeated.
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, fps=12.5) as writer:
        writer.write(odd)
    assert writer.size == (34, 48)
    frames, times, info = read_video(out)
    assert frames.shape == (3, 34, 48, 3) and info.fps == 12.5 and times.tolist() == [0, 0.08, 0.16]
    assert mean_abs_error(frames[:, :33, :47], odd) < 8
    assert mean_abs_error(frames[:, 33], frames[:, 32]) < 8


def test_concatenated_streams_keep_one_size_and_increasing_times(tmp_path: Path) -> None:
    # Two MPEG-TS files glued together: the second restarts its clock and has another size.
    def transport_stream(path: Path, height: int, width: int, n: int) -> bytes:
        encode(path, sample_clip(n, height, width).numpy(), list(range(n)), Fraction(1, 16), fmt="mpegts")
        return path.read_bytes()

    joined = tmp_path / "joined.ts"
    joined.write_bytes(
        transport_stream(tmp_path / "a.ts", H, W, 6) + transport_stream(tmp_path / "b.ts", 32, 48, 5)
    )
    frames, times, info = read_video(joined)
    assert frames.shape == (11, H, W, 3) and (info.height, info.width) == (H, W)
    assert times.tolist()[:6] == [i / 16 for i in range(6)]
    assert bool((times[1:] > times[:-1]).all())
    assert mean_abs_error(frames[6:], resize_frames(sample_clip(5, 32, 48), H, W)) < 12


def test_rotated_video_is_read_upright(tmp_path: Path, clip: torch.Tensor) -> None:
    path = tmp_path / "portrait.mp4"
    encode(path, clip[:3].numpy(), [0, 1, 2], Fraction(1, 16), rotation=90)
    frames, _, info = read_video(path)
    assert info.rotation == 90 and (info.height, info.width) == (W, H)
    upright = torch.rot90(clip[:3], 1, dims=(1, 2))  # 90° counter-clockwise
    assert frames.shape == upright.shape
    assert mean_abs_error(frames, upright) < 8


# ---------------------------------------------------------------------------------------------------------
# Resizing and the resolution rule


def test_resize_keeps_layout_and_dtype(clip: torch.Tensor) -> None:
    small = resize_frames(clip[:4], 32, 48)
    assert small.shape == (4, 32, 48, 3) and small.dtype == torch.uint8
    assert resize_frames(clip[0], 32, 48).shape == (32, 48, 3)
    floats = resize_frames(clip[:2].float() / 255, 128, 192)
    assert floats.shape == (2, 128, 192, 3) and floats.dtype == torch.float32
    assert resize_frames(clip, H, W) is clip  # nothing to do, no copy
    # Up then down again stays close to the original: a mild blur, no shift or colour change.
    again = resize_frames(resize_frames(clip, 2 * H, 2 * W), H, W)
    assert mean_abs_error(again, clip) < 4
    assert (again.float().mean((0, 1, 2)) - clip.float().mean((0, 1, 2))).abs().max() < 1
    with pytest.raises(ValueError, match="frames must be"):
        resize_frames(torch.zeros(4, H, W), 32, 32)
    with pytest.raises(ValueError, match="positive"):
        resize_frames(clip, 0, 32)


def test_resize_is_antialiased() -> None:
    # A one-pixel checkerboard shrunk 4× must become flat grey, not a moiré of black and white.
    checker = ((torch.arange(64).view(-1, 1) + torch.arange(64).view(1, -1)) % 2 * 255).to(torch.uint8)
    frames = checker.view(1, 64, 64, 1).expand(2, 64, 64, 3).contiguous()
    small = resize_frames(frames, 16, 16).float()
    assert small.std().item() < 2 and abs(small.mean().item() - 127.5) < 2


def test_round_size_to_multiples_of_16() -> None:
    same = round_size(480, 832)
    assert (same.height, same.width, same.rounded) == (480, 832, False)
    assert same.describe() == "resolution 832×480"
    hd = round_size(1080, 1920)
    assert (hd.height, hd.width, hd.rounded) == (1088, 1920, True)
    assert hd.describe() == "resolution 1920×1080 rounded to 1920×1088 (a multiple of 16)"
    assert (round_size(33, 47).height, round_size(33, 47).width) == (32, 48)
    assert (round_size(5, 7).height, round_size(5, 7).width) == (16, 16)  # never below one multiple
    assert round_size(24, 40).height == 32 and round_size(24, 40).width == 48  # halves round up
    assert round_size(100, 100, multiple=8).height == 104
    with pytest.raises(ValueError, match="positive"):
        round_size(0, 10)
