"""MP4 recording off the hot path, and JPEG snapshots.

The worker hands frames to a `Recorder` (a queue put, no copy, no encoding); a writer thread encodes
them with PyAV (H.264, yuv420p) at their real times (variable frame rate, millisecond time base), so a
recording plays back at the speed it was made. When the writer falls behind, frames are dropped and
counted rather than slowing the stream. The file is written under a hidden name and renamed into place
when complete. `Mp4Encoder` is that encoder on its own: a replay of a take (replays.py) encodes its frames
at the recording's own times through it, so a bit-exact replay gives the very same MP4 as the recording.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from wanstream.server.frames import OutputFrame, SourceFrame

log = logging.getLogger("wanstream.server")

TIME_BASE = Fraction(1, 1000)
_STOP = object()


class Recorder:
    """One MP4 file fed from any thread; `close()` finishes it (blocking: call it off the event loop)."""

    def __init__(self, path: Path, *, name: str, queue_frames: int = 240) -> None:
        self.path = path
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_frames)
        self.written = 0
        self.dropped = 0
        self.error: str | None = None
        self.first_index: int | None = None  # the session's output index of the first frame recorded
        self._start: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"wanstream-recorder-{name}", daemon=True)
        self._thread.start()

    # FrameSink for the generated stream
    def put(self, frames: Sequence[OutputFrame]) -> None:
        if self.first_index is None and frames:
            self.first_index = frames[0].index  # where a session log's take of this recording starts
        for frame in frames:
            self.put_frame(frame.image, frame.made)

    def flush(self, epoch: int) -> None:
        """A restart does not unmake what was recorded."""

    def put_frame(self, image: SourceFrame, at: float) -> None:
        if self.error is not None:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((image, at))
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 30.0) -> Path | None:
        """Finish the file; returns its path, or None when nothing was recorded (or writing failed)."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return self.path if self.written and self.error is None and self.path.exists() else None

    def _run(self) -> None:
        encoder = Mp4Encoder(self.path)
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                image, at = item  # type: ignore[misc]
                if self._start is None:
                    self._start = at
                encoder.write(image, round((at - self._start) * 1000))
                self.written += 1
            encoder.close()
        except Exception as exc:
            self.error = f"recording failed: {exc}"
            log.warning("%s: %s", self.path, self.error)
        finally:
            encoder.abort()
            # Unblock producers that raced with the stop and drop what they queued.
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()


class Mp4Encoder:
    """Frames into an H.264 MP4 at given times (milliseconds; each later than the one before), with the
    recordings' settings; the file appears at `path` only when `close()` finishes it. Two encodes of the
    same frames at the same times are the same bytes (x264 without mbtree, `X264_REPRODUCIBLE`, is
    deterministic; its rate control reads the times). Not thread-safe: one thread writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.part")
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._last_pts = -1
        self.written = 0

    def write(self, image: SourceFrame, ms: int) -> None:
        """One frame (RGB uint8 [H, W, 3], a torch tensor, or an av.VideoFrame) shown from `ms` on."""
        frame = _as_video_frame(image)
        if self._container is None:
            self._container, self._stream = _open_mp4(self._tmp, frame.width, frame.height)
        stream = self._stream
        assert stream is not None
        frame = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")
        pts = max(ms, self._last_pts + 1)
        self._last_pts = pts
        frame.pts, frame.time_base = pts, TIME_BASE
        for packet in stream.encode(frame):
            self._container.mux(packet)
        self.written += 1

    def close(self) -> Path | None:
        """Finish the file and move it into place; None when no frame was written."""
        if self._container is None or self._stream is None:
            return None
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop an unfinished file (nothing after close())."""
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)


# Without x264's macroblock-tree rate control. With it, the same frames encoded to different bytes from run to
# run in one process while the engine ran beside the encoder (11 different files of 25 runs of one demo job,
# identical frames in; measured 2026-12-07), and a bit-exact replay's recording must be the live one's bytes
# (the studio draws their difference). Without it, 25 of 25 were the same; the files are ~30 % larger
# (and ~0.25 dB better) at the same CRF.
X264_REPRODUCIBLE = "mbtree=0"


def _open_mp4(
    path: Path, width: int, height: int
) -> tuple[av.container.OutputContainer, av.video.stream.VideoStream]:
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height = width + width % 2, height + height % 2
    stream.pix_fmt = "yuv420p"
    stream.time_base = TIME_BASE
    stream.codec_context.time_base = TIME_BASE
    stream.options = {"preset": "veryfast", "crf": "20", "x264-params": X264_REPRODUCIBLE}
    return container, stream


def _as_video_frame(image: SourceFrame) -> av.VideoFrame:
    if isinstance(image, av.VideoFrame):
        return image
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """An RGB uint8 [H, W, 3] image as JPEG bytes (quality 1-100, as in image editors)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    height, width = image.shape[0], image.shape[1]
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = width + width % 2, height + height % 2
    codec.pix_fmt = "yuvj420p"
    codec.time_base = Fraction(1, 1)
    codec.qmin = codec.qmax = round(2 + (100 - quality) * 29 / 99)  # JPEG qscale: 2 (best) … 31
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    frame = frame.reformat(width=codec.width, height=codec.height, format="yuvj420p")
    packets = [*codec.encode(frame), *codec.encode(None)]
    return b"".join(bytes(p) for p in packets)
