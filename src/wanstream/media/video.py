"""Video files in and out (PyAV), frame resizing and the output-resolution rule.

Frames are RGB uint8 torch tensors, `[H, W, 3]` one at a time or `[T, H, W, 3]` as a batch, always in
display orientation (a phone video's rotation flag is applied) and at one size. Each frame carries its
presentation time in seconds, counted from the first frame and strictly increasing, so variable-frame-rate
inputs keep their real timing; `fps` is the stream's average rate.

The writer encodes H.264 MP4 (yuv420p, BT.709) to a hidden temp file beside the target and renames it
into place only when `close()` succeeds: a failed write leaves no output file. `close()` after a
KeyboardInterrupt keeps every frame written so far as a valid, playable MP4 (the interrupt is held back
while a frame is being encoded, so the encoder never loses a packet). Audio is never written.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from wanstream.media.frame import Frame

# Used only when a stream states no frame rate at all (rare: some raw or broken files): Wan's native rate.
FALLBACK_FPS = 16.0
# Output resolution must be a multiple of this: VAE downsampling ×8 times the DiT's 2×2 patches.
RESOLUTION_MULTIPLE = 16


class VideoError(ValueError):
    """A video file that cannot be read or written; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # in display orientation (after rotation)
    height: int
    fps: float  # average frame rate
    frame_count: int | None  # None when the container does not say
    duration: float | None  # seconds; None when the container does not say
    has_audio: bool
    codec: str
    rotation: int  # degrees counter-clockwise applied to every decoded frame (0, 90, 180, 270)


class VideoReader:
    """Decodes a video file frame by frame; use as a context manager or call `close()`.

    Opening probes the file and decodes its first frame, so an unreadable file fails here, with the
    file named, rather than halfway through a run. Frames are decoded once: iterating again (or `read`,
    `chunks`) continues where the last one stopped.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise VideoError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise VideoError(f"{self.path}: not a file")
        if self.path.stat().st_size == 0:
            raise VideoError(f"{self.path}: the file is empty")
        try:
            self._container = av.open(str(self.path), "r")
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: not a readable video file ({_reason(exc)})") from exc
        try:
            self._open_stream()
        except BaseException:
            self._container.close()
            raise

    def _open_stream(self) -> None:
        container = self._container
        if container.format.name in _TEXT_FORMATS:  # FFmpeg would render a text file as ANSI art
            raise VideoError(f"{self.path}: a text file, not a video")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise VideoError(f"{self.path}: no video stream in the file (found: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame- and slice-threaded decoding
        self._stream = stream
        self._frames = self._decode()
        first = next(self._frames, None)
        if first is None:
            raise VideoError(f"{self.path}: the video stream has no decodable frames")
        self._first: av.VideoFrame | None = first
        self._start_pts = first.pts if first.pts is not None else 0
        self._rotation = _quarter_turns(getattr(first, "rotation", 0)) * 90
        self._last_time: float | None = None

        height, width = (first.width, first.height) if self._rotation % 180 else (first.height, first.width)
        fps = _average_fps(stream)
        frame_count = stream.frames or None
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        if fps is None:
            fps = frame_count / duration if frame_count and duration else FALLBACK_FPS
        self.info = VideoInfo(
            path=self.path,
            width=width,
            height=height,
            fps=fps,
            frame_count=frame_count,
            duration=duration,
            has_audio=bool(container.streams.audio),
            codec=stream.codec_context.name,
            rotation=self._rotation,
        )

    def _decode(self) -> Iterator[av.VideoFrame]:
        decoded = 0
        try:
            for frame in self._container.decode(self._stream):
                decoded += 1
                yield frame
        except av.FFmpegError as exc:
            raise VideoError(f"{self.path}: decoding failed after {decoded} frames ({_reason(exc)})") from exc

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self._next_frame()
            if frame is None:
                return
            yield frame

    def _next_frame(self) -> Frame | None:
        if self._first is not None:
            raw, self._first = self._first, None
        else:
            raw = next(self._frames, None)
            if raw is None:
                return None
        image = torch.from_numpy(_to_rgb(raw))
        if self._rotation:
            image = torch.rot90(image, self._rotation // 90, dims=(0, 1)).contiguous()
        if image.shape[:2] != (self.info.height, self.info.width):
            # A stream that changes size mid-way is scaled to its first size (as FFmpeg's CLI does).
            image = resize_frames(image, self.info.height, self.info.width)
        # Exact arithmetic on pts, so 40 frames at 1/16 s land on 2.5 s exactly. Times always increase: a
        # frame without a timestamp, or one that jumps back (concatenated streams), sits one nominal frame
        # after the previous one.
        time = None
        if raw.pts is not None and raw.time_base is not None:
            time = float((raw.pts - self._start_pts) * raw.time_base)
        if self._last_time is None:
            time = 0.0 if time is None else time
        elif time is None or time <= self._last_time:
            time = self._last_time + 1.0 / self.info.fps
        self._last_time = time
        return Frame(image, time)

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of up to `size` frames: (`[T, H, W, 3]` uint8, `[T]` float64 seconds); the last may be short."""
        if size < 1:
            raise ValueError(f"chunk size must be ≥ 1, got {size}")
        images: list[torch.Tensor] = []
        times: list[float] = []
        for image, time in self:
            images.append(image)
            times.append(time)
            if len(images) == size:
                yield torch.stack(images), torch.tensor(times, dtype=torch.float64)
                images, times = [], []
        if images:
            yield torch.stack(images), torch.tensor(times, dtype=torch.float64)

    def read(self, max_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The remaining frames (at most `max_frames`): (`[T, H, W, 3]` uint8, `[T]` float64 seconds)."""
        images: list[torch.Tensor] = []
        times: list[float] = []
        for image, time in self:
            images.append(image)
            times.append(time)
            if max_frames is not None and len(images) >= max_frames:
                break
        if not images:
            empty = torch.empty(0, self.info.height, self.info.width, 3, dtype=torch.uint8)
            return empty, torch.empty(0, dtype=torch.float64)
        return torch.stack(images), torch.tensor(times, dtype=torch.float64)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """The metadata of a video file (decodes one frame to be sure the file is readable)."""
    with VideoReader(path) as reader:
        return reader.info


def stored_frames(path: str | os.PathLike[str]) -> int:
    """How many frames the file really holds: its first video stream's packets, read without decoding
    (a truncated file's index can announce frames whose data is gone)."""
    count = 0
    try:
        with av.open(str(path)) as container:
            for packet in container.demux(container.streams.video[0]):
                count += packet.size > 0  # the demuxer ends each stream with an empty packet
    except (av.FFmpegError, OSError, IndexError):
        pass  # a damaged file ends where its readable data ends
    return count


def read_video(
    path: str | os.PathLike[str], max_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, VideoInfo]:
    """A whole video (or its first `max_frames`): frames `[T, H, W, 3]` uint8, times `[T]` s, metadata."""
    with VideoReader(path) as reader:
        frames, times = reader.read(max_frames)
        return frames, times, reader.info


def _average_fps(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def _quarter_turns(degrees: float | None) -> int:
    return round((degrees or 0) / 90) % 4


_TEXT_FORMATS = {"tty"}
_UNSPECIFIED = 2  # AVCOL_SPC_UNSPECIFIED (PyAV's Colorspace enum has no member for it)


def _to_rgb(frame: av.VideoFrame):  # -> numpy uint8 [H, W, 3]
    # Untagged HD video is BT.709 in practice (what players assume); swscale would assume BT.601.
    if frame.colorspace == _UNSPECIFIED and frame.height >= 720:
        return frame.to_ndarray(format="rgb24", src_colorspace=Colorspace.ITU709)
    return frame.to_ndarray(format="rgb24")


def _reason(exc: BaseException) -> str:
    # FFmpeg errors repeat the file name; keep only what went wrong.
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Resizing and the output-resolution rule


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of `[T, H, W, 3]` or `[H, W, 3]` frames, on their device.

    Returns the same layout and dtype (uint8 is rounded back); the input itself when the size already matches.
    """
    if frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] or [H, W, 3], got shape {tuple(frames.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}×{width}")
    if tuple(frames.shape[-3:-1]) == (height, width):
        return frames
    batch = frames if frames.ndim == 4 else frames.unsqueeze(0)
    x = batch.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    x = x.permute(0, 2, 3, 1)
    if frames.dtype == torch.uint8:
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    else:
        x = x.to(frames.dtype)
    x = x.contiguous()
    return x if frames.ndim == 4 else x[0]


@dataclass(frozen=True)
class RoundedSize:
    height: int
    width: int
    source_height: int
    source_width: int
    multiple: int = RESOLUTION_MULTIPLE

    @property
    def rounded(self) -> bool:
        return (self.height, self.width) != (self.source_height, self.source_width)

    def describe(self) -> str:
        """One line for the user, width×height as video tools print sizes, e.g. 'resolution 1920×1080
        rounded to 1920×1088 (a multiple of 16)'."""
        if not self.rounded:
            return f"resolution {self.width}×{self.height}"
        return (
            f"resolution {self.source_width}×{self.source_height} rounded to {self.width}×{self.height} "
            f"(a multiple of {self.multiple})"
        )


def round_size(height: int, width: int, multiple: int = RESOLUTION_MULTIPLE) -> RoundedSize:
    """Each side rounded to the nearest multiple of `multiple` (halves up, at least one `multiple`)."""
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {height}×{width}")

    def nearest(n: int) -> int:
        return max(multiple, (n + multiple // 2) // multiple * multiple)

    return RoundedSize(nearest(height), nearest(width), height, width, multiple)


# ---------------------------------------------------------------------------------------------------------
# Writing


class VideoWriter:
    """H.264 MP4 writer, atomic and interrupt-safe.

    with VideoWriter("out.mp4", fps=16) as out:
        for chunk in chunks:
            out.write(chunk)          # [T, H, W, 3] uint8, or float in [0, 1]

    Leaving the `with` normally or by KeyboardInterrupt finalises the file with the frames written so far;
    any other exception removes it. Without `with`, call `close()` (also after catching Ctrl-C) or
    `abort()`. Odd frame sizes are padded to even by repeating the last row/column (yuv420p needs even
    sides); `size` is the encoded size.
    """

    def __init__(
        self, path: str | os.PathLike[str], fps: float, *, crf: int = 18, preset: str = "veryfast"
    ) -> None:
        self.path = Path(path)
        if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps <= 1000:
            raise ValueError(f"fps must be a number in (0, 1000], got {fps!r}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        if self.path.is_dir():
            raise VideoError(f"{self.path}: is a folder; give a file name such as {self.path / 'output.mp4'}")
        folder = self.path.parent
        if not folder.is_dir():
            raise VideoError(f"{self.path}: the folder {folder} does not exist")
        self.fps = fps
        self.rate = (fps if isinstance(fps, Fraction) else Fraction(float(fps))).limit_denominator(
            1001
        )  # 29.97 → 30000/1001
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # encoded (height, width), set by the first write
        self._source_size: tuple[int, int] | None = None
        self._options = {"crf": str(crf), "preset": preset}
        # A hidden, unique temp file beside the target (same file system, so the final rename is atomic),
        # created with the usual permissions (mkstemp's would be owner-only).
        self._tmp = folder / f".{self.path.name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as exc:
            raise VideoError(f"{self.path}: cannot write in {folder} ({exc.strerror})") from exc
        try:
            self._container = av.open(str(self._tmp), "w", format="mp4", options={"movflags": "+faststart"})
        except av.FFmpegError as exc:
            self._tmp.unlink(missing_ok=True)
            raise VideoError(f"{self.path}: cannot create the MP4 ({_reason(exc)})") from exc
        self._stream: av.video.stream.VideoStream | None = None
        self._state = "open"  # open → closed | aborted

    def write(self, frames: torch.Tensor) -> None:
        """Append `[T, H, W, 3]` or `[H, W, 3]` frames: uint8, or float in [0, 1] (clamped), any device."""
        if self._state != "open":
            raise RuntimeError(f"{self.path}: the writer is {self._state}")
        batch = self._as_uint8_batch(frames)
        if batch.shape[0] == 0:
            return
        if self._stream is None:
            self._start_stream(batch.shape[1], batch.shape[2])
        elif tuple(batch.shape[1:3]) != self._source_size:
            got, want = tuple(batch.shape[1:3]), self._source_size
            raise ValueError(f"frame size changed from {want[0]}×{want[1]} to {got[0]}×{got[1]}")
        batch = _pad_to_even(batch).cpu().contiguous().numpy()
        for image in batch:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame = frame.reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
            )
            frame.pts = self.frames_written
            with _interrupts_deferred():
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
                self.frames_written += 1

    def close(self) -> Path | None:
        """Finish the file and move it into place; returns its path, or None when no frame was written."""
        if self._state == "closed":
            return self.path if self.frames_written else None
        if self._state == "aborted":
            raise RuntimeError(f"{self.path}: the writer was aborted")
        if self.frames_written == 0:
            self.abort()
            self._state = "closed"
            return None
        try:
            with _interrupts_deferred():
                for packet in self._stream.encode(None):  # flush the encoder's delayed frames
                    self._container.mux(packet)
                self._container.close()
                os.replace(self._tmp, self.path)
                self._state = "closed"
        except BaseException as exc:
            self.abort()
            if isinstance(exc, av.FFmpegError | OSError):
                raise VideoError(f"{self.path}: finishing the video failed ({_reason(exc)})") from exc
            raise
        return self.path

    def abort(self) -> None:
        """Drop the output: nothing is left at `path` (an existing file there is untouched)."""
        if self._state != "open":
            return
        self._state = "aborted"
        with contextlib.suppress(Exception):
            self._container.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without close()/abort() must not leave its temp file behind.
        if getattr(self, "_state", None) == "open":
            self.abort()

    def _start_stream(self, height: int, width: int) -> None:
        stream = self._container.add_stream("libx264", rate=self.rate)
        stream.height, stream.width = height + height % 2, width + width % 2
        stream.pix_fmt = "yuv420p"
        stream.options = self._options
        codec = stream.codec_context
        codec.colorspace = Colorspace.ITU709
        codec.color_primaries = ColorPrimaries.BT709
        codec.color_trc = ColorTrc.BT709
        codec.color_range = ColorRange.MPEG
        self._stream = stream
        self._source_size = (height, width)
        self.size = (stream.height, stream.width)

    @staticmethod
    def _as_uint8_batch(frames: torch.Tensor) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3] or [H, W, 3] RGB, got shape {tuple(frames.shape)}")
        if frames.dtype == torch.uint8:
            return frames
        if not frames.is_floating_point():
            raise ValueError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
        return (frames.float().clamp(0, 1) * 255).round_().to(torch.uint8)


def _pad_to_even(batch: torch.Tensor) -> torch.Tensor:
    if batch.shape[1] % 2:
        batch = torch.cat([batch, batch[:, -1:]], dim=1)
    if batch.shape[2] % 2:
        batch = torch.cat([batch, batch[:, :, -1:]], dim=2)
    return batch


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C until the block ends, so encode+mux of a frame is never cut in half.

    Only in the main thread and only while Python's default SIGINT handler is installed; otherwise a no-op.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
