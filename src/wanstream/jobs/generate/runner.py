"""Running a planned `generate` job: `run(plan, pipeline)` streams the frames through a `StreamSession` chunk
by chunk and writes the MP4 atomically. Ctrl-C keeps what was generated so far as a valid MP4 and raises
`GenerationInterrupted` (a KeyboardInterrupt carrying the partial result).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from wanstream.engine.measure import percentile
from wanstream.engine.session import ChunkEvent, StreamSession
from wanstream.jobs.generate.planning import GeneratePlan, InputSource, plan
from wanstream.jobs.generate.request import GenerateError, GenerateRequest
from wanstream.jobs.generate.result import (
    GenerateProgress,
    GenerateResult,
    GenerationInterrupted,
    PromptSwitch,
)
from wanstream.jobs.generate.stats import GenerateStats, number_text
from wanstream.jobs.generate.vace import VaceFeed
from wanstream.media.frame import TIME_EPS
from wanstream.media.resample import resample
from wanstream.media.sample import iter_sample_clip
from wanstream.media.video import Frame, VideoReader, VideoWriter
from wanstream.weights.lora import LoraError

if TYPE_CHECKING:
    from wanstream.pipeline import Pipeline

ProgressCallback = Callable[[GenerateProgress], None]


def generate(
    request: GenerateRequest, pipeline: Pipeline, *, on_progress: ProgressCallback | None = None
) -> GenerateResult:
    """Plan and run in one call (`pipeline`: a loaded `wanstream.Pipeline`)."""
    return run(plan(request, demo=pipeline.is_demo), pipeline, on_progress=on_progress)


def run(
    job: GeneratePlan,
    pipeline: Pipeline,
    *,
    on_progress: ProgressCallback | None = None,
    load_s: float | None = None,
) -> GenerateResult:
    """Stream the planned job through a new session of `pipeline` and write the MP4."""
    runner = _Runner(job, pipeline, on_progress)
    with torch.inference_mode():
        return runner.run(load_s)


# An engine call: a chunk pushed (or generated), a cut's drain, or the end-of-input flush.
CallKind = Literal["chunk", "drain", "flush"]


@dataclass
class _Call:
    """One engine call, timed: a chunk pushed (or generated), a cut's drain, or the end-of-input flush."""

    kind: CallKind
    seconds: float
    frames_out: int
    steady: bool


class _Runner:
    def __init__(self, job: GeneratePlan, pipeline: Pipeline, on_progress: ProgressCallback | None) -> None:
        self.job = job
        self.pipeline = pipeline
        self.on_progress = on_progress
        self.timeline = job.timeline
        self.lanes = len(job.settings.denoising_steps) if job.settings.batching == "stream" else 1
        self.events: list[ChunkEvent] = []
        self.calls: list[_Call] = []
        self.switches: list[PromptSwitch] = []
        self.notes = list(job.notes)
        self.segment: int | None = None  # the segment in force
        self.warm_left = 0  # chunks of warm-up left in the current stream
        self.written = 0
        self.fed = 0  # frames given to the engine (input frames; scheduled output frames in text mode)
        self.first_frame_at: float | None = None
        self.vace: VaceFeed | None = None

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, load_s: float | None) -> GenerateResult:
        job = self.job
        self.t0 = time.perf_counter()
        try:
            self.session: StreamSession = self.pipeline.session(job.settings)
        except LoraError as exc:  # a LoRA that does not fit this model: bad input, nothing written
            raise GenerateError(str(exc)) from None
        if job.vace is not None:  # before the output opens: a pipeline without VACE fails here
            self.vace = VaceFeed(job.vace, self.session, job.source.fps)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        self.writer = VideoWriter(job.output, job.source.fps)
        try:
            with self.vace if self.vace is not None else contextlib.nullcontext():
                if job.source.kind == "text":
                    self._run_text()
                else:
                    self._run_video()
        except KeyboardInterrupt:
            output = self.writer.close()  # keeps every frame written so far
            result = self._result(output, load_s, interrupted=True)
            if job.stats_json is not None:
                result.write_stats(job.stats_json)
            raise GenerationInterrupted(result) from None
        except BaseException:
            self.writer.abort()  # a failed run leaves no output file
            raise
        output = self.writer.close()
        result = self._result(output, load_s, interrupted=False)
        if job.stats_json is not None:
            result.write_stats(job.stats_json)
        return result

    def _run_video(self) -> None:
        pending: deque[Frame] = deque()
        frames = _frames(self.job.source, self._on_vfr)
        exhausted = False
        # A last-frame image goes on the video's last chunk: read one frame ahead to know which that is.
        ahead = 1 if self.job.vace is not None and self.job.vace.last_frame is not None else 0
        while True:
            need = self.session.chunk_frames  # 5 after a (re)start, else 4: exact across cuts
            while len(pending) < need + ahead and not exhausted:
                frame = next(frames, None)
                if frame is None:
                    exhausted = True
                else:
                    pending.append(frame)
            if not pending:
                break
            span = min(need, len(pending))
            times = [pending[i].time for i in range(span)]
            if self._switch_for(times):
                continue  # a cut restarts the stream: the chunk may now take 5 frames
            if span < need:
                break  # input ended inside this chunk: flush pads it
            batch = torch.stack([pending.popleft().image for _ in range(need)])
            last = exhausted and not pending
            self.fed += need
            self._call("chunk", partial(self._push, batch, last), frames=(self.fed - need, self.fed))
        if pending:  # the input ended inside a chunk: flush pads it (and trims its output to these frames)
            rest = torch.stack([f.image for f in pending])
            self.fed += len(pending)
            self._call("flush", partial(self._finish, rest), frames=(self.fed - len(rest), self.fed))
        else:
            self._call("flush", partial(self._finish, None))
        source = self.job.source
        if source.kind == "file" and not source.resample and source.frames and self.fed < source.frames:
            self.notes.append(
                f"{source.path}: {source.frames} frames expected but only {self.fed} could be "
                "decoded (a truncated or damaged file?)"
            )

    def _run_text(self) -> None:
        total = self.job.source.frames
        assert total is not None
        fps = self.job.source.fps
        while self.fed < total:
            need = self.session.chunk_frames
            span = min(need, total - self.fed)
            if self._switch_for([(self.fed + i) / fps for i in range(span)]):
                continue
            frames = (self.fed, self.fed + span)
            self.fed += need
            self._call("chunk", partial(self._generate, self.fed >= total), frames=frames)
        self._call("flush", self.session.flush)

    # -- one chunk, with VACE's inputs queued first ----------------------------------------------------
    def _push(self, batch: torch.Tensor, last: bool) -> torch.Tensor:
        """One whole chunk of input frames (of the control video, when it drives text mode)."""
        vace = self.vace
        if vace is None:
            return self.session.push(batch)
        if last:
            vace.set_last_frame()
        if self.job.source.kind == "control":
            return vace.cond.push(vace.control_frames(batch), vace.masks(batch.shape[0]))
        vace.push_control(batch.shape[0])
        return self.session.push(batch)

    def _finish(self, rest: torch.Tensor | None) -> torch.Tensor:
        """End of input: a last partial chunk (`rest`, padded by the engine, its padding trimmed) and the drain."""
        vace = self.vace
        if vace is not None and rest is not None:
            vace.set_last_frame()
        if vace is not None and self.job.source.kind == "control":
            out = (
                vace.cond.push(vace.control_frames(rest), vace.masks(rest.shape[0]))
                if rest is not None
                else None
            )
            flushed = vace.cond.flush()
            return flushed if out is None else torch.cat([out, flushed])
        if rest is None:
            return self.session.flush()
        if vace is not None:  # the control frames of this chunk, padded like its input frames
            vace.push_control(self.session.chunk_frames, take=rest.shape[0])
        return torch.cat([self.session.push(rest), self.session.flush()])

    def _generate(self, last: bool) -> torch.Tensor:
        if last and self.vace is not None:
            self.vace.set_last_frame()
        return self.session.generate(1)

    # -- prompts ---------------------------------------------------------------------------------------
    def _switch_for(self, times: list[float]) -> bool:
        """Apply the segment active at the chunk's last frame, if it is not the one in force."""
        index = self.timeline.index_at(times[-1])
        if index == self.segment:
            return False
        seg = self.timeline.segments[index]
        offset = next((i for i, t in enumerate(times) if t >= seg.start - TIME_EPS), 0)
        first = self.segment is None
        transition = None if first else seg.transition
        self.segment = index
        self._call("drain", lambda: self.session.set_prompts(seg.prompts, transition=transition, drain=True))
        if self.vace is not None:  # a segment's vace_context_scale applies from the same chunk as its prompt
            self.vace.set_scale(self.job.vace.scale_for(seg))  # type: ignore[union-attr]
        self.switches.append(
            PromptSwitch(
                segment=index,
                start_time=seg.start,
                frame=self.fed + offset,
                frame_time=times[offset],
                chunk=None,  # known once the chunk runs (see _call)
                chunk_frames=None,
                transition_chunks=transition.steps if transition is not None else 0,
                prompts=self.session.prompt.describe(),
            )
        )
        return True

    # -- one engine call -------------------------------------------------------------------------------
    def _call(
        self,
        kind: CallKind,
        step: Callable[[], torch.Tensor],
        frames: tuple[int, int] | None = None,  # text mode: the output frames the chunk makes
    ) -> None:
        last = self.events[-1].chunk if self.events else -1
        start = time.perf_counter()
        out = step().cpu()  # on the host before the timer stops: honest latency
        seconds = time.perf_counter() - start
        new = self._new_events(last)
        self.events.extend(new)
        if self.vace is not None:
            self.vace.collect(last)
        ran = next((e for e in new if e.kind != "flush"), None)  # the content chunk of this call, if any
        steady = False
        if ran is not None:
            if kind == "chunk":
                if ran.stream_start:
                    self.warm_left = self.lanes
                steady = self.warm_left == 0
                self.warm_left = max(0, self.warm_left - 1)
            switch = self.switches[-1] if self.switches else None
            if switch is not None and switch.chunk is None:
                switch.chunk = ran.chunk
                switch.chunk_frames = frames if ran.kind == "text" else ran.input_frames
        self.calls.append(_Call(kind, seconds, out.shape[0], steady))
        self._write(out)

    def _new_events(self, last: int) -> list[ChunkEvent]:
        new = []
        for event in reversed(self.session.events):  # newest first; chunk ids only grow
            if event.chunk <= last:
                break
            new.append(event)
        return new[::-1]

    def _write(self, out: torch.Tensor) -> None:
        if self.job.source.kind == "text" and self.job.source.frames is not None:
            out = out[: max(0, self.job.source.frames - self.written)]  # the last chunk may overshoot
        if not out.shape[0]:
            return
        if self.first_frame_at is None:
            self.first_frame_at = time.perf_counter()
        self.writer.write(out)
        self.written += out.shape[0]
        if self.on_progress is not None:
            expected = self.job.source.frames
            self.on_progress(GenerateProgress(self.written, expected, time.perf_counter() - self.t0))

    def _on_vfr(self, message: str) -> None:
        self.notes.append(message)

    # -- the result ------------------------------------------------------------------------------------
    def _result(self, output: Path | None, load_s: float | None, *, interrupted: bool) -> GenerateResult:
        wall = time.perf_counter() - self.t0
        chunks = [c for c in self.calls if c.kind == "chunk"]
        steady = [c for c in chunks if c.steady]
        latencies = sorted(c.seconds for c in steady)
        steady_time = sum(latencies)
        steady_frames = sum(c.frames_out for c in steady)
        stats = GenerateStats(
            frames=self.written,
            input_frames=self.fed if self.job.source.kind != "text" else 0,
            chunks=sum(1 for e in self.events if e.kind != "flush"),
            wall_s=wall,
            load_s=load_s,
            time_to_first_frame_s=None if self.first_frame_at is None else self.first_frame_at - self.t0,
            first_chunk_ms=chunks[0].seconds * 1e3 if chunks else None,
            steady_chunks=len(steady),
            steady_fps=steady_frames / steady_time if steady and steady_time > 0 else None,
            chunk_latency_p50_ms=percentile(latencies, 0.5) * 1e3 if latencies else None,
            chunk_latency_p90_ms=percentile(latencies, 0.9) * 1e3 if latencies else None,
        )
        c = self.pipeline.components
        return GenerateResult(
            plan=self.job,
            output=output,
            stats=stats,
            events=self.events,
            switches=self.switches,
            model=self.pipeline.label,
            device=str(c.device),
            dtype=str(c.dtype).removeprefix("torch."),
            interrupted=interrupted,
            notes=self.notes,
            vace=self.vace.chunks if self.vace is not None else [],
        )


# ---------------------------------------------------------------------------------------------------------
# Frame sources


def _frames(source: InputSource, note: Callable[[str], None]) -> Iterator[Frame]:
    if source.kind == "sample":
        assert source.frames is not None
        index = 0
        for batch in iter_sample_clip(source.frames, source.height, source.width, source.fps):
            for image in batch:
                yield Frame(image, index / source.fps)
                index += 1
        return
    assert source.path is not None and source.info is not None
    with VideoReader(source.path) as reader:
        frames: Iterator[Frame] = iter(reader)
        if source.resample:
            frames = resample(frames, source.fps, 1.0 / reader.info.fps)
        else:
            frames = _vfr_watch(frames, reader.info.fps, note)
        for i, frame in enumerate(frames):
            if source.max_frames is not None and i >= source.max_frames:
                return
            yield frame


def _vfr_watch(frames: Iterator[Frame], fps: float, note: Callable[[str], None]) -> Iterator[Frame]:
    """Pass frames through; note once if their times stray from the average rate's grid by half a frame."""
    noted = False
    for i, frame in enumerate(frames):
        if not noted and abs(frame.time - i / fps) > 0.5 / fps:
            noted = True
            note(
                f"the input has a variable frame rate: every frame is kept and written at the average "
                f"{number_text(fps)} fps (prompts still switch by the real timestamps); give --fps to resample "
                "it to a constant rate that keeps its real timing"
            )
        yield frame
