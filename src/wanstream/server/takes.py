"""Every stream's session log (docs/replay.md): the journal, its frames on disk, the digests of what was sent.

A stream keeps a log from its first chunk (the replay must start where the stream did), its frames written
by `DiskFrames` on the process's writer threads, within a size limit (`serve --take-log-mib`; past it the log stops,
and says where). The digest of every frame the worker hands out is computed on the same writers, so the engine
thread only queues references. `GET /api/v1/sessions/{id}/log` sends it as one `.wslog` file,
also after the stream has ended (the last `sessions.KEPT_TAKES`, 4, are kept: their frames are on disk).

The download is written as it is sent (`LogStream`): a thread of its own writes the zip, through the same
`takes.log.write_log` as `save_log`, into a bounded queue that the response reads, so nothing is copied on disk
(a long take's log is GiB) and the first bytes leave at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import shutil
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from wanstream.engine.components import Components
from wanstream.engine.journal import SessionJournal
from wanstream.engine.settings import StreamSettings
from wanstream.server.frames import OutputFrame
from wanstream.takes.frames import DiskFrames, writers
from wanstream.takes.log import log_header, write_log

log = logging.getLogger("wanstream.server")

MiB = 1024 * 1024
# A download is sent in pieces of at least this, with at most this many pieces written ahead of the client:
# a slow client makes the writer wait, so a download holds a few MiB whatever the log weighs.
STREAM_CHUNK_BYTES = MiB
STREAM_QUEUE_CHUNKS = 4


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

    def log_stream(self, components: Components, first_output: int = 0) -> LogStream:
        """A download of the log so far. Its header is read now (blocking: the model files' digests; call it
        off the event loop), as `save_log` does, so a live take's log ends where it stood at the request. Two
        downloads at once need no lock: each has its own snapshot and pipe, and the frame files they copy are
        never changed once written (`DiskFrames.path` waits for a file still being written)."""
        header = log_header(self.journal, components, first_output=first_output)
        return LogStream(header, self.store, self.session_id)

    def finish(self) -> None:
        """The stream ended: let the writers finish (blocking)."""
        if not self.finished:
            self.finished = True
            self.digests.close()
            self.store.close()

    def remove(self) -> None:
        self.finish()
        shutil.rmtree(self.folder, ignore_errors=True)


class LogStreamError(RuntimeError):
    """The log could not be read while it was being sent: the response is broken off, so the client sees an
    incomplete download rather than a complete-looking file that is not."""


class _Cancelled(Exception):
    """The download was abandoned: raised out of the writer's next write, which ends its zip."""


_END = object()  # the writer has written the whole zip


class _Pipe(io.RawIOBase):
    """The writable, unseekable file a download's zip is written into: what zipfile writes goes to the event loop
    in pieces of at least `chunk` bytes through a queue of `depth` pieces, and the writer waits while it is full
    (back-pressure from the client)."""

    def __init__(self, chunk: int, depth: int, loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> None:
        super().__init__()
        self.queue: queue.Queue[Any] = queue.Queue(max(1, depth))
        self.cancelled = threading.Event()
        self._chunk = chunk
        self._buf = bytearray()
        self._loop = loop
        self._ready = ready

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buf += data
        if len(self._buf) >= self._chunk:  # zipfile writes 8 KiB at a time: gathered into fewer, larger sends
            self.send(bytes(self._buf))
            self._buf.clear()
        return memoryview(data).nbytes

    def finish(self) -> None:
        if self._buf:
            self.send(bytes(self._buf))
            self._buf.clear()
        self.send(_END)

    def send(self, item: Any) -> None:
        # Checked before every put. `LogStream.cancel` sets the flag, then empties the queue: a put already past
        # the check gets through (or is woken), and the next one raises, so the writer never waits on a queue
        # nobody reads.
        if self.cancelled.is_set():
            raise _Cancelled
        self.queue.put(item)
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop is closed (the server stopped): no one will read this
            self.cancelled.set()
            raise _Cancelled from None


class LogStream:
    """One download of a take's log (`Take.log_stream`): `chunks()` starts the writer thread and yields the zip
    as it is written. The writer runs on a thread of its own rather than the event loop's executor: a slow
    client keeps it waiting for the whole download, which would take one of that executor's few threads."""

    def __init__(self, header: dict[str, Any], store: DiskFrames, session_id: str) -> None:
        self.session_id = session_id
        self._header = header
        self._store = store
        self._pipe: _Pipe | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._pipe is not None:
            raise RuntimeError("a LogStream is sent once")
        ready = asyncio.Event()  # set by the writer after each put: the loop never blocks on the queue
        pipe = self._pipe = _Pipe(STREAM_CHUNK_BYTES, STREAM_QUEUE_CHUNKS, asyncio.get_running_loop(), ready)
        name = f"wanstream-take-download-{self.session_id}"
        threading.Thread(target=self._write, args=(pipe,), name=name, daemon=True).start()
        try:
            while True:
                ready.clear()  # before the get: a put after a failed get sets it again
                try:
                    item = pipe.queue.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    log.warning("the session log of %s was cut off mid-download: %s", self.session_id, item)
                    raise LogStreamError(f"the session log could not be read: {item}") from item
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the writer (the client went away, or the response ended however it did): its next write raises,
        and emptying the queue wakes it if it waits for room. Safe to call more than once."""
        pipe = self._pipe
        if pipe is None:
            return
        pipe.cancelled.set()
        with contextlib.suppress(queue.Empty):
            while True:
                pipe.queue.get_nowait()

    def _write(self, pipe: _Pipe) -> None:
        try:
            write_log(pipe, self._header, self._store)
            pipe.finish()
        except Exception as exc:  # an OSError (the take's frames removed, a disk error), or cancelled
            if not pipe.cancelled.is_set():
                with contextlib.suppress(_Cancelled):
                    pipe.send(exc)  # the response breaks off (and logs it)


class LogResponse(StreamingResponse):
    """A take's log as a download, `name` its file name. It stops the writer however the response ends: a
    client gone mid-body ends the response in `send`, outside the body's generator, whose `finally` would
    run only when the generator is collected."""

    media_type = "application/zip"

    def __init__(self, stream: LogStream, name: str) -> None:
        quoted = quote(name)  # as FileResponse writes it: curl -OJ and browsers keep the name
        disposition = (
            f'attachment; filename="{name}"' if quoted == name else f"attachment; filename*=utf-8''{quoted}"
        )
        super().__init__(stream.chunks(), headers={"Content-Disposition": disposition})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.cancel()
