"""A stream's take replayed on the server (the studio's *Replay take*; docs/replay.md for the log itself).

    POST   /api/v1/sessions/{id}/replay       {"take": "recording" | "stream"} → 202 the job
    GET    /api/v1/replays/{job}              state, progress (calls done / total), the report when done
    GET    /api/v1/replays/{job}/replay.mp4   the replayed take (H.264)
    DELETE /api/v1/replays/{job}              cancel it and remove it with its files

A replay runs the session's log again, on its own thread, on the server's loaded networks: the ones the
live stream ran on, so every frame the stream sent must come out identical (the report checks each
against its digest). It uses the device like a stream, so it holds one of the `--max-sessions` slots until
its thread has stopped (done, failed or cancelled). Its frames from the take's start are encoded exactly as
the recording was (`recording.Mp4Encoder`, at the recording's own frame times): a bit-exact replay of a
recording is the very same MP4, and the studio's difference of the two videos is black. Only the frames
the live stream sent are written (those with a digest: a frame made and never sent is in no recording). A
take of the whole stream (no recording) is encoded at the take's frame rate.

A take of a recording replays the stream from its start (the state at the recording's first frame depends
on everything before it) up to the recording's last frame, not beyond. The job record is the only state
the event loop shares with the thread; the last `MAX_KEPT` finished jobs are kept, older ones are
removed with their files.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from wanstream.engine.components import Components
from wanstream.engine.lora import configure_loras
from wanstream.server.recording import Mp4Encoder
from wanstream.server.sessions import Recording, SessionManager, release_memory
from wanstream.server.takes import Take
from wanstream.takes.log import LogError, TakeLog, journal_log
from wanstream.takes.replay import replay

log = logging.getLogger("wanstream.server")

TakeKind = Literal["recording", "stream"]
MAX_KEPT = 8  # finished jobs remembered (with their replay.mp4)
JOIN_AT_SHUTDOWN_S = 10.0
DEFAULT_FPS = 16.0  # Wan's native rate, when a take's timing cannot tell


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    take: TakeKind | None = Field(
        None,
        description="where the replayed video starts: the recording's first frame, or the stream's "
        "(default: the recording when the session has a stopped one with frames, else the stream)",
    )


class ReplayRefused(Exception):
    """The replay cannot start; `status` is the HTTP status, the message says why and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Cancelled(Exception):
    pass


@dataclass
class ReplayJob:
    id: str
    session_id: str
    take: TakeKind
    folder: Path
    first_output: int  # the session's output frame the replayed video starts at
    state: Literal["queued", "running", "done", "failed", "cancelled"] = "queued"
    stage: str = "waiting to start"
    done: int = 0  # calls replayed
    total: int = 0
    error: str | None = None
    report: dict[str, Any] | None = None  # ReplayReport.to_json() and its "summary"
    notes: list[str] = field(default_factory=list)
    frames_written: int = 0
    fps: float | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    removed: bool = False  # DELETE came while the thread ran: it removes the files when it ends
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def video(self) -> Path:
        return self.folder / "replay.mp4"

    def view(self) -> dict[str, Any]:
        base = f"/api/v1/replays/{self.id}"
        has_video = self.state == "done" and self.frames_written > 0
        return {
            "job": self.id,
            "session_id": self.session_id,
            "take": self.take,
            "state": self.state,
            "stage": self.stage,
            "progress": {"done": self.done, "total": self.total},
            "error": self.error,
            "report": self.report,
            "notes": list(self.notes),
            "first_output": self.first_output,
            "frames_written": self.frames_written,
            "fps": self.fps,
            "replay_url": f"{base}/replay.mp4" if has_video else None,
            "live_url": (
                f"/api/v1/sessions/{self.session_id}/recording/output.mp4"
                if self.take == "recording"
                else None
            ),
            "created": self.created,
            "finished": self.finished,
        }


class ReplayJobs:
    """The server's replays (one per app). `start` runs on the event loop and never blocks on work."""

    def __init__(self, manager: SessionManager, root: Path, keep: int = MAX_KEPT) -> None:
        self.manager = manager
        self.root = root
        self.keep = keep
        self.jobs: dict[str, ReplayJob] = {}
        self._lock = threading.Lock()  # the dict and a job's end; never held during work
        self._seq = itertools.count(1)

    def get(self, job_id: str) -> ReplayJob | None:
        with self._lock:
            return self.jobs.get(job_id)

    def start(self, session_id: str, take: TakeKind | None) -> ReplayJob:
        """Start replaying the session's take. ReplayRefused (404 / 409 / 503) with the reason; Busy or
        NotReady (sessions.py) when no stream slot is free or no model is loaded. Nothing changes then."""
        manager = self.manager
        found = manager.take_for(session_id)
        if found is None:
            raise ReplayRefused(
                404,
                f"no session log for session {session_id!r} (an unknown or long-gone session, or a server "
                "run with --take-log-mib 0)",
            )
        reason = found.journal.unreplayable
        if reason:
            raise ReplayRefused(409, f"this take cannot be replayed: {reason}")
        recording = manager.recording_for(session_id)
        recorded = _recorded(recording)
        if take is None:
            take = "recording" if recorded else "stream"
        if take == "recording" and not recorded:
            if recording is not None and recording.stopped is None:
                raise ReplayRefused(409, "the session is still recording: stop the recording first")
            raise ReplayRefused(
                409, "this session has no stopped recording with frames: record first, or replay take=stream"
            )
        pipeline = manager.model.pipeline
        if pipeline is None:
            raise ReplayRefused(503, manager.model.not_ready_reason())
        job_id = f"replay-{next(self._seq)}-{secrets.token_hex(3)}"
        manager.hold_slot(job_id)  # Busy / NotReady: nothing was changed
        try:
            folder = self.root / job_id
            folder.mkdir(parents=True)
            live = recording if take == "recording" else None
            first = live.output.first_index or 0 if live is not None else 0
            job = ReplayJob(job_id, session_id, take, folder, first_output=first)
            thread = threading.Thread(
                target=self._run,
                args=(job, found, pipeline.components, live),
                name=f"wanstream-{job_id}",
                daemon=True,
            )
            job.thread = thread
            with self._lock:
                self._evict()
                self.jobs[job_id] = job
            thread.start()
        except BaseException:
            manager.release_slot(job_id)
            raise
        return job

    def remove(self, job_id: str) -> bool:
        """Cancel a job and forget it; its files go now, or when its thread ends. False: no such job."""
        with self._lock:
            job = self.jobs.pop(job_id, None)
            if job is None:
                return False
            job.removed = True
            job.cancel.set()
            ended = job.finished is not None
        if ended:
            shutil.rmtree(job.folder, ignore_errors=True)
        return True

    def close(self) -> None:
        """Server shutdown (blocking): cancel every replay, wait for their threads, remove the files."""
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel.set()
        deadline = time.monotonic() + JOIN_AT_SHUTDOWN_S
        for job in jobs:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))
        shutil.rmtree(self.root, ignore_errors=True)

    def _evict(self) -> None:
        """Under the lock: forget the oldest finished jobs beyond `keep` (with their files)."""
        ended = [j for j in self.jobs.values() if j.finished is not None]
        for old in ended[: max(0, len(ended) + 1 - self.keep)]:
            del self.jobs[old.id]
            shutil.rmtree(old.folder, ignore_errors=True)

    # -- the job's thread ------------------------------------------------------------------------------
    def _run(self, job: ReplayJob, take: Take, components: Components, recording: Recording | None) -> None:
        state: Literal["done", "failed", "cancelled"] = "failed"
        encoder = Mp4Encoder(job.video)
        try:
            job.state, job.stage = "running", "reading the take"
            # Its frames are read where the stream's log keeps them (no copy of the take is written).
            with journal_log(take.journal, components, first_output=job.first_output) as taken:
                job.stage = "replaying"
                self._replay(job, taken, components, recording, encoder)
            job.stage = "finishing the video"
            encoder.close()
            state = "done"
        except _Cancelled:
            state = "cancelled"
            job.error = "cancelled"
        except LogError as exc:
            job.error = str(exc)
        except torch.OutOfMemoryError as exc:
            job.error = f"not enough device memory for the replay (streams running beside it?): {exc}"
        except Exception as exc:  # a replay never takes the server down; it says why it failed
            log.exception("replay %s of session %s failed", job.id, job.session_id)
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            encoder.abort()  # nothing after a finished close()
            self.manager.release_slot(job.id)  # the slot is free before anyone reads "done"
            release_memory()
            with self._lock:
                job.finished = time.time()
                job.state, job.stage = state, state
                removed = job.removed
            if removed:
                shutil.rmtree(job.folder, ignore_errors=True)

    def _replay(
        self,
        job: ReplayJob,
        taken: TakeLog,
        components: Components,
        recording: Recording | None,
        encoder: Mp4Encoder,
    ) -> None:
        times: list[int] | None = None
        limit: int | None = None  # frames to write (a recording's), None: to the end of the log
        if recording is not None:
            assert recording.output_path is not None
            times = frame_times(recording.output_path)
            dropped = recording.output.dropped
            limit = len(times) + dropped
            if dropped:
                job.notes.append(
                    f"the recording dropped {dropped} frames (a busy encoder): the two videos drift apart "
                    "after the first of them"
                )
            # Up to the recording's last frame (the limit-th frame sent from the take's first): the calls
            # after it change nothing in the video.
            sent_from = sorted(k for k in taken.digests if k >= job.first_output)
            if limit and len(sent_from) >= limit:
                end = sent_from[limit - 1] + 1
                taken.ops = list(itertools.takewhile(lambda op: op.first_output < end, taken.ops))
            job.fps = _fps_of(times)
        else:
            job.fps = taken.fps
        interval = 1000.0 / job.fps
        job.total = len(taken.ops)
        # LoRAs by name from the server's LoRA folder only, as for the live stream (whose engine thread
        # set the same source).
        configure_loras(components, self.manager.lora_files)

        sent = taken.digests  # the frames the live stream handed out (the recording has the same ones)

        def on_frames(first: int, frames: np.ndarray) -> None:
            for j in range(frames.shape[0]):
                if sent and first + j not in sent:
                    continue  # made, never sent (docs/replay.md): not in the recording either
                i = job.frames_written  # the frame's number in the take's video
                if limit is not None and i >= limit:
                    return
                if times is not None and i < len(times):
                    ms = times[i]
                elif times:
                    ms = round(times[-1] + (i - len(times) + 1) * interval)
                else:
                    ms = round(i * interval)
                encoder.write(frames[j], ms)
                job.frames_written += 1

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            _check(job)

        report = replay(taken, components, on_frames=on_frames, progress=progress)
        _check(job)
        job.report = {**report.to_json(), "summary": report.summary()}


def _check(job: ReplayJob) -> None:
    if job.cancel.is_set():
        raise _Cancelled


def _recorded(recording: Recording | None) -> bool:
    """A stopped recording whose output has frames (a replay's live side to compare with)."""
    return (
        recording is not None
        and recording.stopped is not None
        and recording.output_path is not None
        and recording.output.first_index is not None
    )


def frame_times(path: Path) -> list[int]:
    """The presentation times (ms from the first frame) of an MP4's video frames, in order (the packets'
    times: nothing is decoded)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        base = stream.time_base
        assert base is not None
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
    if not pts:
        return []
    return [round(Fraction(p - pts[0]) * base * 1000) for p in pts]


def _fps_of(times: list[int]) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        return DEFAULT_FPS
    return round((len(times) - 1) * 1000 / (times[-1] - times[0]), 2)
