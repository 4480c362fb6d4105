"""Frames of a session log, kept bit for bit.

RGB uint8 frames (what cameras and files give) are stored as FFV1 in Matroska: lossless, any size, a few
times smaller than raw for real video, and read by every ffmpeg. Anything else (float frames, grey masks,
prompt embeddings) is stored as `.npy`. `DiskFrames` is the server's frame store: the process's writer threads
encode each call's frames into the stream's folder as they come, so the engine thread only hands over a tensor.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

log = logging.getLogger("wanstream.takes")


def blob_name(key: int, frames: torch.Tensor) -> str:
    """The file name a stored tensor gets: `.mkv` for RGB uint8 [T, H, W, 3], `.npy` for anything else."""
    return f"{key:06d}.mkv" if _is_rgb_video(frames) else f"{key:06d}.npy"


def encode_blob(frames: torch.Tensor) -> bytes:
    if not _is_rgb_video(frames):
        buf = io.BytesIO()
        np.save(buf, frames.numpy(), allow_pickle=False)
        return buf.getvalue()
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=30)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "bgr0"  # lossless RGB in FFV1 (rgb24 → bgr0 → rgb24 is exact)
        for image in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_blob(name: str, data: bytes) -> torch.Tensor:
    if name.endswith(".npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    with av.open(io.BytesIO(data)) as container:
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(images))


def _is_rgb_video(frames: torch.Tensor) -> bool:
    return frames.dtype == torch.uint8 and frames.dim() == 4 and frames.shape[-1] == 3 and frames.shape[0] > 0


WRITERS = 3  # PyAV encodes without the GIL, and a 720p camera gives ~30 frames a second


class Writers:
    """The process's take writers, shared by every stream's log: a fixed set of threads, all started with the
    first stream that keeps a log and never more (each thread's allocator arena outlives it: a server that made
    writers per stream grew ~4 MiB a stream, and the server's thread counts stay flat across sessions)."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._run, name=f"wanstream-take-writer-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._jobs.put((fn, args))

    def _run(self) -> None:
        while True:
            fn, args = self._jobs.get()
            try:
                fn(*args)
            except Exception:  # the job reports its own failures; a writer never dies of one
                log.exception("a take writer's job failed")


_pool: Writers | None = None
_pool_lock = threading.Lock()


def writers() -> Writers:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = Writers(WRITERS)
        return _pool


class DiskFrames:
    """A journal's frame store on disk: `add` hands the frames to the shared writers, which encode them into
    `folder/frames/`.

    `nbytes` counts the encoded bytes (what the log will weigh). `get` waits for the key's file. A write that
    fails (disk full) is logged and remembered: `error` says why, and the log saved later reports it."""

    def __init__(self, folder: Path, *, queue_calls: int = 256) -> None:
        self.folder = folder
        (folder / "frames").mkdir(parents=True, exist_ok=True)
        self.nbytes = 0
        self.error: str | None = None
        self.names: dict[int, str] = {}
        self._next = 0
        self._limit = queue_calls
        self._queued = 0  # handed to the writers, not written yet
        self._written = threading.Condition()
        self._done: set[int] = set()

    def add(self, frames: torch.Tensor) -> int:
        # Never blocks the engine: writers `queue_calls` calls behind end the log (the journal truncates it).
        with self._written:
            if self._queued >= self._limit:
                raise OSError("the log's frame writers fell behind the stream (a slow disk?)")
            self._queued += 1
        key, self._next = self._next, self._next + 1
        self.names[key] = blob_name(key, frames)
        writers().submit(self._write, key, frames)
        return key

    def get(self, key: int) -> torch.Tensor:
        path = self.path(key)
        return decode_blob(path.name, path.read_bytes())

    def path(self, key: int, timeout: float = 60.0) -> Path:
        """The file of `key`, once written (raises if writing failed or took longer than `timeout`)."""
        with self._written:
            if not self._written.wait_for(lambda: key in self._done or self.error is not None, timeout):
                raise TimeoutError(f"frames {key} of the log were not written within {timeout:.0f} s")
        if key not in self._done:
            raise OSError(f"the log's frames could not be written: {self.error}")
        return self.folder / "frames" / self.names[key]

    def close(self, timeout: float = 60.0) -> None:
        """Wait until what was handed to the writers is written (or has failed)."""
        with self._written:
            self._written.wait_for(lambda: self._queued == 0, timeout)

    def _write(self, key: int, frames: torch.Tensor) -> None:
        written, error = 0, None
        try:
            data = encode_blob(frames)
            (self.folder / "frames" / self.names[key]).write_bytes(data)
            written = len(data)
        except Exception as exc:  # keep the stream; the log reports it
            log.warning("a session log's frames could not be written (%s); the log stops here", exc)
            error = f"{type(exc).__name__}: {exc}"
        with self._written:
            if error is not None:
                self.error = error
            else:
                self.nbytes += written
                self._done.add(key)
            self._queued -= 1
            self._written.notify_all()
