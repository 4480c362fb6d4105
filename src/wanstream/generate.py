"""The offline job: an input video (or the built-in clip, or nothing in text mode) and prompts in, an MP4 out.

    from wanstream import Pipeline
    from wanstream.generate import GenerateRequest, generate

    request = GenerateRequest(input="in.mp4", timeline="examples/timeline-feline.json", output="out.mp4")
    result = generate(request, Pipeline.load())       # or Pipeline.demo(): tiny random weights
    print(result.stats.summary())

Two stages, so that nothing heavy happens before the input is known to be good:

* `plan(request)` validates everything — the timeline, the settings, the input video (probed: one frame is
  decoded), the output path — and decides resolution, frame rate and length. It raises `GenerateError`
  (naming the field or file) and touches nothing on disk.
* `run(plan, pipeline)` streams the frames through a `StreamSession` chunk by chunk and writes the MP4
  atomically. Ctrl-C keeps what was generated so far as a valid MP4 and raises `GenerationInterrupted`
  (a KeyboardInterrupt carrying the partial result).

Rules (docs/generate.md explains them for users):

* Frames: every input frame is processed once, so the output has exactly as many frames as the input
  (`frames` caps it; `fps` first resamples the input by timestamps to that rate). Text mode makes `frames`.
* Prompts: the segment whose start a frame's timestamp has reached is active at that frame; a chunk is
  conditioned on the segment active at its *last* frame, so a new prompt applies from the chunk that
  contains the segment's first frame (when two segments start within one chunk, the later one wins).
* Resolution: the input video's (the built-in clip's), each side rounded to a multiple of 16; a timeline's
  resolution applies only in text mode; `height`/`width` override (one alone keeps the aspect ratio).
* Settings: request fields > the timeline's settings > the engine's defaults.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from pydantic import ValidationError

from wanstream.engine.session import ChunkEvent, StreamSession
from wanstream.engine.settings import Codec, Mode, StreamSettings
from wanstream.engine.vace import VaceChunk, VaceInputError
from wanstream.jobs.generate.request import GenerateError, GenerateRequest
from wanstream.jobs.generate.stats import GenerateStats, frames_text, number_text, percentile, rounded
from wanstream.jobs.generate.vace import VaceFeed, VacePlan, check_length, chunks_to_json, plan_vace
from wanstream.media.resample import resample
from wanstream.media.sample import SAMPLE_FPS, SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH, iter_sample_clip
from wanstream.media.video import (
    RESOLUTION_MULTIPLE,
    Frame,
    VideoError,
    VideoInfo,
    VideoReader,
    VideoWriter,
    round_size,
    stored_frames,
)
from wanstream.timeline import TIME_EPS, Timeline, TimelineError, load_timeline
from wanstream.weights.lora import LoraError, resolve_lora_path
from wanstream.weights.store import ENV_LORA_DIR

if TYPE_CHECKING:
    from wanstream.pipeline import Pipeline

# Used when neither a timeline nor prompts are given (the built-in clip is an outdoor and an indoor scene).
DEFAULT_PROMPT = (
    "An oil painting in the style of Van Gogh, swirling expressive brush strokes, thick impasto texture, "
    "vivid cobalt blues and golden yellows, warm evening light, rich detail"
)
TEXT_FPS = 16.0  # Wan's native frame rate: text-mode output
TEXT_SIZE = (480, 832)  # the model's training size: text mode without a timeline resolution
# The demo model (tiny, random weights) runs on any CPU; without an input video it uses a small, short clip
# (3 s at 16 fps, with one of the clip's scene cuts) so the whole job takes seconds.
DEMO_SIZE = (96, 160)
DEMO_FRAMES = 49
# The demo follows an input video's size up to this many pixels (832×480, the real model's size) and
# scales larger inputs down to fit: its DiT's attention grows with the square of the pixel count, and
# at 1280×720 it would fall to about 1 fps on two cores.
DEMO_MAX_PIXELS = 832 * 480


# ---------------------------------------------------------------------------------------------------------
# The plan: everything validated and decided, nothing loaded


@dataclass(frozen=True)
class InputSource:
    """Where frames come from, at the rate they are fed to the engine."""

    kind: Literal["file", "sample", "text", "control"]  # control: a VACE control video drives text mode
    height: int  # frames as read (the engine resizes them to the output size)
    width: int
    fps: float  # rate of the frames fed to the engine (= the output's)
    frames: int | None  # how many will be fed; None when the container does not say
    path: Path | None = None
    info: VideoInfo | None = None
    resample: bool = False  # an input video resampled to `fps` by timestamps
    max_frames: int | None = None

    def describe(self) -> str:
        count = frames_text(self.frames) if self.frames is not None else "frames"
        if self.kind == "text":
            return f"text mode: {count} at {number_text(self.fps)} fps"
        if self.kind == "sample":
            return (
                f"the built-in sample clip ({count}, {self.width}×{self.height}, {number_text(self.fps)} fps)"
            )
        assert self.info is not None
        if self.kind == "control":
            rate = f"{number_text(self.info.fps)} fps" + (
                f", resampled to {number_text(self.fps)} fps" if self.resample else ""
            )
            return f"text mode steered by the control video {self.path} ({self.info.width}×{self.info.height}, {rate})"
        rate = f"{number_text(self.info.fps)} fps"
        if self.resample:
            rate += f", resampled to {number_text(self.fps)} fps"
        return f"{self.path} ({self.info.width}×{self.info.height}, {rate}, {self.info.codec})"


@dataclass(frozen=True)
class GeneratePlan:
    request: GenerateRequest
    settings: StreamSettings
    timeline: Timeline
    source: InputSource
    output: Path
    stats_json: Path | None
    demo: bool
    notes: tuple[str, ...]  # what the user should know (rounding, ignored settings, dropped audio…)
    vace: VacePlan | None = None  # VACE inputs, validated
    # With --extend-prompts: what each prompt was extended into (the timeline already holds the extended texts).
    extended_prompts: tuple[dict[str, Any], ...] = ()

    @property
    def mode(self) -> Mode:
        return self.settings.mode


def plan(request: GenerateRequest, *, demo: bool = False) -> GeneratePlan:
    """Validate the request and decide every parameter of the job (raises `GenerateError`).

    `demo`: the job will run on the tiny random-weight model, so the built-in clip and text mode default
    to a small size and length.
    """
    notes: list[str] = []
    timeline = _timeline(request, notes)
    ts = timeline.settings

    if request.mode == "text" and request.input is not None:
        raise GenerateError(f"mode 'text' generates from prompts alone; drop the input video {request.input}")
    if request.mode is not None:
        mode: Mode = request.mode
    elif request.input is not None:
        mode = "video"
        if ts.input_mode == "text":
            notes.append("the timeline's inputMode is 'text', but an input video was given: video mode")
    elif request.control_video is not None:
        mode = "text"  # the control video drives generation (Scope routes the input video to VACE)
        if ts.input_mode == "video":
            notes.append(
                "the timeline's inputMode is 'video', but the control video drives text mode (give an input "
                "video to restyle it, with the control video steering it)"
            )
    else:
        mode = ts.input_mode or "video"

    source = _source(request, mode, demo, notes)
    try:
        vace = plan_vace(request, timeline, control_is_input=source.kind == "control", notes=notes)
        if vace is not None:
            check_length(vace, None if source.frames is None else 1 if source.frames <= 5 else 2)
    except VaceInputError as exc:
        raise GenerateError(str(exc)) from None
    height, width = _resolution(request, source, timeline, demo, notes)
    source, length_from = _with_length(source, request, timeline, demo, height, width)
    if demo and source.kind not in ("file", "control"):
        # (a timeline's size replaced by the demo's has its own note)
        sized = (request.height, request.width) != (None, None) or bool(ts.height and ts.width)
        small = [] if sized else [f"{width}×{height}"]
        small += [frames_text(source.frames)] if length_from == "default" else []
        if small:
            notes.append(
                f"demo model: small defaults ({', '.join(small)}) so it runs in seconds on a CPU; "
                "choose with --width/--height/--frames"
            )
    vae = request.vae or ("taehv" if demo else "wan")
    if demo and request.vae is None and mode == "video":
        notes.append(
            "demo model: the TAEHV encoder and decoder (the tiny Wan VAE's 3-D convolutions are slow at full "
            "size on a CPU; --vae wan to use it)"
        )
    settings = _settings(request, timeline, mode, height, width, vae, vace=vace is not None)
    _check_lora_files(settings)
    output, stats_json = _check_outputs(request)
    _note_unreached_segments(timeline, source, notes)
    if mode == "text" and settings.denoising_steps[0] < 1000:
        notes.append(
            f"text mode starts from pure noise: a first step of {settings.denoising_steps[0]} (below 1000) "
            "gives washed-out video; try --steps 1000,750"
        )
    return GeneratePlan(request, settings, timeline, source, output, stats_json, demo, tuple(notes), vace)


def _timeline(request: GenerateRequest, notes: list[str]) -> Timeline:
    if request.timeline is not None and request.prompts is not None:
        raise GenerateError("give either a timeline or prompts, not both")
    if isinstance(request.timeline, Timeline):
        return request.timeline
    try:
        if request.timeline is not None:
            return load_timeline(request.timeline)
        if request.prompts:
            return Timeline.constant(request.prompts)
    except TimelineError as exc:
        raise GenerateError(str(exc)) from None
    notes.append("no prompt given: using the default prompt (choose one with --prompt or --timeline)")
    return Timeline.constant([DEFAULT_PROMPT])


def _source(request: GenerateRequest, mode: Mode, demo: bool, notes: list[str]) -> InputSource:
    if mode == "text" and request.control_video is not None:
        # VACE: the control video plays the input's part (frame count, rate and size follow it).
        return _file_source(request, Path(request.control_video), "control", notes)
    if mode == "text":
        return InputSource("text", 0, 0, request.fps or TEXT_FPS, None)
    if request.input is None:
        h, w = DEMO_SIZE if demo else (SAMPLE_HEIGHT, SAMPLE_WIDTH)
        return InputSource("sample", h, w, request.fps or SAMPLE_FPS, None)
    return _file_source(request, Path(request.input), "file", notes)


def _file_source(
    request: GenerateRequest, path: Path, kind: Literal["file", "control"], notes: list[str]
) -> InputSource:
    try:
        with VideoReader(path) as reader:
            info = reader.info
    except VideoError as exc:
        raise GenerateError(str(exc) if kind == "file" else f"--control-video: {exc}") from None
    if info.has_audio:
        notes.append(f"{path}: the audio track is dropped (the output has video only)")
    # --fps always resamples (a constant-rate input at its own rate comes out frame for frame; a variable-rate
    # one becomes constant-rate with its real timing).
    resample = request.fps is not None
    frames = info.frame_count
    if request.fps is not None and info.duration:
        frames = max(1, round(info.duration * request.fps))  # an estimate, for the progress bar
    if info.frame_count and not resample:
        stored = stored_frames(path)
        if stored < info.frame_count:
            notes.append(
                f"{path}: the file announces {info.frame_count} frames but holds only {stored} (a truncated "
                f"or damaged file?): the output will have at most {frames_text(stored)}"
            )
            frames = stored
    if request.frames is not None:
        frames = min(frames, request.frames) if frames is not None else None
    return InputSource(
        kind,
        info.height,
        info.width,
        request.fps or info.fps,
        frames,
        path=path,
        info=info,
        resample=resample,
        max_frames=request.frames,
    )


def _resolution(
    request: GenerateRequest, source: InputSource, timeline: Timeline, demo: bool, notes: list[str]
) -> tuple[int, int]:
    ts = timeline.settings
    timeline_size = (ts.height, ts.width) if ts.height and ts.width else None
    explicit = (request.height, request.width) != (None, None)
    if source.kind in ("file", "control"):
        base, what = (
            (source.height, source.width),
            f"the {'input' if source.kind == 'file' else 'control'} video",
        )
        if timeline_size and timeline_size != base and not explicit:
            notes.append(
                f"the timeline's resolution {timeline_size[1]}×{timeline_size[0]} is not used: the output "
                f"follows {what} (give --height/--width to choose)"
            )
    else:  # nothing to follow: text mode, or the procedural clip (it renders at any size)
        default = (
            DEMO_SIZE if demo else (source.height, source.width) if source.kind == "sample" else TEXT_SIZE
        )
        if timeline_size and demo and not explicit:
            notes.append(
                f"demo model: {default[1]}×{default[0]} instead of the timeline's "
                f"{timeline_size[1]}×{timeline_size[0]} (give --width/--height to choose)"
            )
            base, what = default, "the demo size"
        elif timeline_size:
            base, what = timeline_size, "the timeline's resolution"
        else:
            base, what = default, "the default size"
    if request.height is not None and request.width is not None:
        # Exact: StreamSettings rejects sizes that are not multiples of 16.
        return request.height, request.width
    if request.height is not None or request.width is not None:
        # One side given: the other keeps the aspect ratio of `base`, rounded to a multiple of 16.
        if request.height is not None:
            h = request.height
            w = _round16(h * base[1] / base[0])
        else:
            w = request.width  # type: ignore[assignment]
            h = _round16(w * base[0] / base[1])
        notes.append(f"resolution {w}×{h} (the other side keeps the aspect ratio of {what})")
        return h, w
    if demo and source.kind in ("file", "control") and base[0] * base[1] > DEMO_MAX_PIXELS:
        scale = (DEMO_MAX_PIXELS / (base[0] * base[1])) ** 0.5
        h, w = (max(16, math.floor(side * scale / 16) * 16) for side in base)  # down: never over the limit
        notes.append(
            f"demo model: {what} is {base[1]}×{base[0]}; the demo runs at {w}×{h} "
            "(it keeps to 832×480 pixels or fewer so it stays interactive on a CPU; --width/--height to choose)"
        )
        return h, w
    size = round_size(*base)
    if size.rounded:
        notes.append(f"{what}: {size.describe()}")
    return size.height, size.width


def _with_length(
    source: InputSource, request: GenerateRequest, timeline: Timeline, demo: bool, height: int, width: int
) -> tuple[InputSource, Literal["file", "frames", "timeline", "default"]]:
    """Text mode and the built-in clip: length from `frames`, else the timeline's end, else the default.
    The clip is rendered at the output size (it is procedural: any size is native)."""
    if source.kind in ("file", "control"):
        return source, "file"
    if request.frames is not None:
        frames, length_from = request.frames, "frames"
    elif request.timeline is not None and math.isfinite(timeline.duration):
        frames, length_from = max(1, math.ceil(timeline.duration * source.fps - TIME_EPS)), "timeline"
    else:
        frames, length_from = (DEMO_FRAMES if demo else SAMPLE_FRAMES), "default"
    return InputSource(source.kind, height, width, source.fps, frames), length_from


# Request fields as the command line spells them (for messages).
_FLAGS = {
    "steps": "--steps",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "noise_scale": "--noise-scale",
}


def _settings(
    request: GenerateRequest,
    timeline: Timeline,
    mode: Mode,
    height: int,
    width: int,
    vae: Codec,
    *,
    vace: bool = False,
) -> StreamSettings:
    values: dict[str, Any] = timeline.settings.to_update().model_dump(exclude_unset=True)
    values.pop("mode", None)
    given = {
        "seed": request.seed,
        "steps": request.steps,
        "noise_scale": request.noise_scale,
        "noise_controller": request.noise_controller,
        "loras": request.loras,
        "lora_mode": request.lora_mode,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    values.update(height=height, width=width, mode=mode, encoder=vae, decoder=vae)
    try:
        settings = StreamSettings.model_validate({**values, "batching": "none"})
        batching = request.batching
        if vace:  # the VACE conditioner runs chunk by chunk
            if batching == "stream":
                raise GenerateError(
                    "--batching stream cannot be used with VACE (--control-video, --ref-image, --first-frame, "
                    "--last-frame): VACE conditions each chunk as it is denoised; use --batching none or auto"
                )
            batching = "none"
        if batching == "auto":  # lanes need ≥ 2 steps to pay off; one step is the same either way
            batching = "none" if len(settings.denoising_steps) == 1 else "stream"
        return StreamSettings.model_validate({**values, "batching": batching})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name} ({_FLAGS[name]}): {msg}" if name in _FLAGS else f"{name}: {msg}")
        raise GenerateError("invalid settings: " + "; ".join(problems)) from None


def _check_lora_files(settings: StreamSettings) -> None:
    """Every LoRA file exists (looked up as the engine will: the path, else in WANSTREAM_LORA_DIR); their
    contents are checked against the model when the session starts, before the output is opened."""
    folder = os.environ.get(ENV_LORA_DIR)
    for lora in settings.loras:
        try:
            resolve_lora_path(lora.path, Path(folder).expanduser() if folder else None, confine=False)
        except LoraError as exc:
            raise GenerateError(f"--lora: {exc}") from None


def _check_outputs(request: GenerateRequest) -> tuple[Path, Path | None]:
    output = Path(request.output)
    _check_writable(output, "output")
    if output.suffix.lower() != ".mp4":
        raise GenerateError(f"output {output}: the output is an H.264 MP4; give a name ending in .mp4")
    if request.input is not None and _same_file(output, Path(request.input)):
        raise GenerateError(f"output {output} is the input video; choose another output name")
    for flag, given in (("--control-video", request.control_video), ("--mask-video", request.mask_video)):
        if given is not None and _same_file(output, Path(given)):
            raise GenerateError(f"output {output} is the {flag} file; choose another output name")
    stats = Path(request.stats_json) if request.stats_json is not None else None
    if stats is not None:
        _check_writable(stats, "stats file")
        if _same_file(stats, output):
            raise GenerateError(f"the stats file {stats} is the output video; choose another name")
    return output, stats


def _check_writable(path: Path, what: str) -> None:
    if path.is_dir():
        raise GenerateError(f"{what} {path} is a folder; give a file name")
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise GenerateError(f"{what} {path}: {existing or folder} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GenerateError(f"{what} {path}: cannot write in {existing}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _note_unreached_segments(timeline: Timeline, source: InputSource, notes: list[str]) -> None:
    if source.kind in ("file", "control"):
        info = source.info
        end = info.duration if info is not None and info.duration is not None else None
        if end is not None and source.max_frames is not None:
            end = min(end, source.max_frames / source.fps)
    else:
        end = source.frames / source.fps if source.frames is not None else None
    if end is None:
        return
    late = [i for i, s in enumerate(timeline.segments) if i > 0 and s.start >= end - TIME_EPS]
    if late:
        which = ", ".join(str(i + 1) for i in late)
        hint = " (give --frames to make it longer)" if source.kind != "file" else ""
        notes.append(
            f"the video ends at {end:.2f} s: timeline segment(s) {which} start later and are not used{hint}"
        )


# ---------------------------------------------------------------------------------------------------------
# The result


class GenerateProgress(NamedTuple):
    frames: int  # output frames written so far
    total: int | None  # expected output frames (None: unknown)
    elapsed_s: float


@dataclass
class PromptSwitch:
    """When a timeline segment took effect."""

    segment: int  # index into the timeline's segments
    start_time: float  # the segment's start (s)
    frame: int  # first frame at or after start_time (input frame; output frame in text mode)
    frame_time: float  # that frame's timestamp (s)
    chunk: int | None  # the engine chunk that first used it (see the event log)
    chunk_frames: tuple[int, int] | None  # that chunk's [start, end) frames (input; output in text mode)
    transition_chunks: int  # chunks of blending into it (0: at once)
    prompts: tuple[tuple[str, float], ...]  # (text, normalised weight)

    def describe(self) -> str:
        where = f"frame {self.frame} ({self.frame_time:.2f} s)"
        if self.chunk_frames is not None:
            where += f" → chunk {self.chunk} (frames {self.chunk_frames[0]}–{self.chunk_frames[1] - 1})"
        how = f", blending over {self.transition_chunks} chunks" if self.transition_chunks else ""
        text = self.prompts[0][0] if len(self.prompts) == 1 else f"{len(self.prompts)} prompts blended"
        text = text if len(text) <= 60 else text[:57] + "..."
        return f"segment {self.segment + 1} from {where}{how}: {text}"


@dataclass
class GenerateResult:
    plan: GeneratePlan
    output: Path | None  # None when no frame was written
    stats: GenerateStats
    events: list[ChunkEvent]  # the engine's event log of every chunk (input, flush and text chunks)
    switches: list[PromptSwitch]
    model: str
    device: str
    dtype: str
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)  # the plan's notes and what the run found
    vace: list[VaceChunk] = field(default_factory=list)  # with VACE: what each chunk used (mode, scale, ...)

    def to_dict(self) -> dict[str, Any]:
        s, p = self.stats, self.plan
        return {
            "output": str(self.output) if self.output is not None else None,
            "interrupted": self.interrupted,
            "model": self.model,
            "demo": p.demo,
            "device": self.device,
            "dtype": self.dtype,
            "mode": p.mode,
            "input": p.source.describe(),
            "height": p.settings.height,
            "width": p.settings.width,
            "fps": p.source.fps,
            "frames": s.frames,
            "input_frames": s.input_frames,
            "chunks": s.chunks,
            "wall_s": rounded(s.wall_s),
            "load_s": rounded(s.load_s),
            "overall_fps": rounded(s.overall_fps),
            "time_to_first_frame_s": rounded(s.time_to_first_frame_s),
            "first_chunk_ms": rounded(s.first_chunk_ms),
            "steady_state_fps": rounded(s.steady_fps),
            "steady_state_chunks": s.steady_chunks,
            "chunk_latency_p50_ms": rounded(s.chunk_latency_p50_ms),
            "chunk_latency_p90_ms": rounded(s.chunk_latency_p90_ms),
            "settings": {**p.settings.model_dump(mode="json"), "steps": list(p.settings.denoising_steps)},
            "denoising_steps": list(p.settings.denoising_steps),
            "prompt_switches": [
                {
                    "segment": w.segment,
                    "start_time": w.start_time,
                    "frame": w.frame,
                    "frame_time": rounded(w.frame_time),
                    "chunk": w.chunk,
                    "chunk_frames": list(w.chunk_frames) if w.chunk_frames is not None else None,
                    "transition_chunks": w.transition_chunks,
                    "prompts": [{"text": t, "weight": wt} for t, wt in w.prompts],
                }
                for w in self.switches
            ],
            "notes": list(self.notes),
            **({"vace": self._vace_dict()} if p.vace is not None else {}),
            **({"extended_prompts": list(p.extended_prompts)} if p.extended_prompts else {}),
        }

    def _vace_dict(self) -> dict[str, Any]:
        v = self.plan.vace
        assert v is not None
        return {
            "inputs": v.describe(),
            "control_video": str(v.control.path) if v.control is not None else None,
            "mask_video": str(v.mask.path) if v.mask is not None else None,
            "ref_images": [str(p) for p in v.references],
            "ref_once": v.references_once,
            "first_frame": str(v.first_frame) if v.first_frame is not None else None,
            "last_frame": str(v.last_frame) if v.last_frame is not None else None,
            "scale": v.scale,
            "corrected": v.corrected,
            "chunks": chunks_to_json(self.vace),
        }

    def summary(self) -> str:
        return "\n".join(self.stats.summary_lines())

    def write_stats(self, path: Path) -> None:
        """Write `to_dict()` as JSON, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the frames generated so far were kept as a valid MP4 (`result.output`)."""

    def __init__(self, result: GenerateResult) -> None:
        super().__init__("interrupted")
        self.result = result


# ---------------------------------------------------------------------------------------------------------
# Running


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


@dataclass
class _Call:
    """One engine call, timed: a chunk pushed (or generated), a cut's drain, or the end-of-input flush."""

    kind: Literal["chunk", "drain", "flush"]
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
            need = _next_chunk_frames(self.session)
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
            need = _next_chunk_frames(self.session)
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
        kind: Literal["chunk", "drain", "flush"],
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
            chunk_latency_p50_ms=percentile(latencies, 50) * 1e3 if latencies else None,
            chunk_latency_p90_ms=percentile(latencies, 90) * 1e3 if latencies else None,
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


def _next_chunk_frames(session: StreamSession) -> int:
    """Frames the session's next chunk takes: 5 after a (re)start, else 4 (read from the session so the job
    stays exact across cuts)."""
    return session.chunk_frames


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


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def _round16(x: float) -> int:
    return max(RESOLUTION_MULTIPLE, round(x / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)
