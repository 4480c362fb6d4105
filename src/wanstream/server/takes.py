"""Every stream's session log (docs/replay.md): the journal, its frames on disk, the digests of what was sent.

A stream keeps a log from its first chunk (the replay must start where the stream did), its frames written
by `DiskFrames` on the process's writer threads, within a size limit (`serve --take-log-mib`; past it the log stops,
and says where). The digest of every frame the worker hands out is computed on the same writers, so the engine
thread only queues references. `GET /api/v1/sessions/{id}/log` saves it as one `.wslog` file,
also after the stream has ended (the last `sessions.KEPT_TAKES`, 4, are kept: their frames are on disk).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wanstream.engine.components import Components
from wanstream.engine.journal import SessionJournal
from wanstream.engine.settings import StreamSettings
from wanstream.server.frames import OutputFrame
from wanstream.takes.frames import DiskFrames, writers
from wanstream.takes.log import save_log

log = logging.getLogger("wanstream.server")

MiB = 1024 * 1024


class FrameDigests:
    """A FrameSink that records the sha256 of every frame the stream sends, on the process's take writers
    (threads shared by every stream: none made per stream)."""

    def __init__(self, journal: SessionJournal, name: str, queue_chunks: int = 64) -> None:
        self.journal = journal
        self.dropped = (
            0  # frames whose digest was not taken (the writers fell behind): not compared on replay
        )
        self._limit = queue_chunks
        self._queued = 0
        self._cond = threading.Condition()

    def put(self, frames: Sequence[OutputFrame]) -> None:
        with self._cond:
            if self._queued >= self._limit:
                self.dropped += len(frames)
                return
            self._queued += 1
        writers().submit(self._digest, frames)

    def flush(self, epoch: int) -> None:
        """A cut does not unmake what was sent."""

    def close(self, timeout: float = 60.0) -> None:
        """Wait for the digests of what was sent."""
        with self._cond:
            self._cond.wait_for(lambda: self._queued == 0, timeout)

    def _digest(self, frames: Sequence[OutputFrame]) -> None:
        try:
            for frame in frames:
                if frame.index >= 0:
                    self.journal.note_output(frame.index, frame.image)
        finally:
            with self._cond:
                self._queued -= 1
                self._cond.notify_all()


@dataclass
class Take:
    """One stream's log: the journal the engine records into, its frames' folder, the digest sink."""

    session_id: str
    folder: Path
    journal: SessionJournal
    store: DiskFrames
    digests: FrameDigests
    finished: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, session_id: str, folder: Path, settings: StreamSettings, limit_mib: int) -> Take:
        store = DiskFrames(folder)
        journal = SessionJournal(
            settings=settings.model_dump(mode="json"),
            output="uint8",
            frames=store,
            limit_bytes=limit_mib * MiB,
        )
        return cls(session_id, folder, journal, store, FrameDigests(journal, session_id))

    def save(self, components: Components, first_output: int = 0) -> Path:
        """The log so far as one file in the take's folder (blocking: call it off the event loop)."""
        with self._lock:  # two downloads at once write one after the other
            return save_log(
                self.journal,
                self.folder / f"wanstream-{self.session_id}.wslog",
                components,
                first_output=first_output,
            )

    def finish(self) -> None:
        """The stream ended: let the writers finish (blocking)."""
        if not self.finished:
            self.finished = True
            self.digests.close()
            self.store.close()

    def remove(self) -> None:
        self.finish()
        shutil.rmtree(self.folder, ignore_errors=True)
