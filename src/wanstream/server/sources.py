"""Server-side input for headless sessions: a video file played in real time into the worker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from wanstream.media.video import VideoError, VideoReader

log = logging.getLogger("wanstream.server")


class FileSource:
    """Plays a video file at its own frame times (looping if asked) on a thread, like a camera would.

    The file is opened (and its first frame decoded) in the constructor, so a bad file fails the
    request that named it rather than the session later.
    """

    def __init__(
        self, path: Path, feed: Callable[[torch.Tensor, float], None], *, loop: bool, name: str
    ) -> None:
        self.path = path
        self._feed = feed
        self._loop = loop
        self._stop = threading.Event()
        self._reader = VideoReader(path)
        self.info = self._reader.info
        self.frames = 0
        self.finished = False  # the file ended (and does not loop)
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"wanstream-source-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        reader: VideoReader | None = self._reader
        try:
            while not self._stop.is_set():
                assert reader is not None
                start = time.monotonic()
                for image, at in reader:
                    delay = start + at - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                    self._feed(image, time.monotonic())
                    self.frames += 1
                    if self._stop.is_set():
                        return
                reader.close()
                reader = None
                if not self._loop:
                    self.finished = True
                    return
                reader = VideoReader(self.path)
        except VideoError as exc:
            self.error = str(exc)
            log.warning("file source stopped: %s", exc)
        finally:
            if reader is not None:
                reader.close()
