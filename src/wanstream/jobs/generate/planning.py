"""Planning a `generate` job: `plan(request)` validates everything — the timeline, the settings, the input
video (probed: one frame is decoded), the output path — and decides resolution, frame rate and length. It
raises `GenerateError` (naming the field or file) and touches nothing on disk.

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

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from wanstream.engine.prompts import DEFAULT_PROMPT
from wanstream.engine.settings import (
    CONDITIONED_BATCHING,
    DEFAULT_TEXT_STEPS,
    Codec,
    Mode,
    StreamSettings,
    conditioning_problem,
    text_steps_problem,
)
from wanstream.engine.vace import VaceInputError
from wanstream.jobs.generate.request import GenerateError, GenerateRequest
from wanstream.jobs.generate.stats import frames_text, number_text
from wanstream.jobs.generate.vace import VacePlan, check_length, plan_vace
from wanstream.media.frame import TIME_EPS
from wanstream.media.sample import SAMPLE_FPS, SAMPLE_FRAMES, SAMPLE_HEIGHT, SAMPLE_WIDTH
from wanstream.media.video import (
    RESOLUTION_MULTIPLE,
    VideoError,
    VideoInfo,
    VideoReader,
    round_size,
    stored_frames,
)
from wanstream.timeline import Timeline, TimelineError, load_timeline
from wanstream.weights.lora import LoraError, resolve_lora_path
from wanstream.weights.store import ENV_LORA_DIR

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


def plan(request: GenerateRequest, *, demo: bool = False) -> GeneratePlan:
    """Validate the request and decide every parameter of the job (raises `GenerateError`).

    `demo`: the job will run on the tiny random-weight model, so the built-in clip and text mode default
    to a small size and length.
    """
    notes: list[str] = []
    timeline = _timeline(request, notes)
    ts = timeline.settings
    mode = _mode(request, timeline, notes)
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
    if problem := text_steps_problem(settings):
        notes.append(f"{problem}; try --steps {','.join(map(str, DEFAULT_TEXT_STEPS))}")
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


def _mode(request: GenerateRequest, timeline: Timeline, notes: list[str]) -> Mode:
    """The request's mode, else video with an input video, text with only a control video, else the timeline's."""
    ts = timeline.settings
    if request.mode == "text" and request.input is not None:
        raise GenerateError(f"mode 'text' generates from prompts alone; drop the input video {request.input}")
    if request.mode is not None:
        return request.mode
    if request.input is not None:
        if ts.input_mode == "text":
            notes.append("the timeline's inputMode is 'text', but an input video was given: video mode")
        return "video"
    if request.control_video is not None:
        if ts.input_mode == "video":
            notes.append(
                "the timeline's inputMode is 'video', but the control video drives text mode (give an input "
                "video to restyle it, with the control video steering it)"
            )
        return "text"  # the control video drives generation (Scope routes the input video to VACE)
    return ts.input_mode or "video"


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
        if vace:
            if batching != "auto" and (problem := conditioning_problem(batching)):
                raise GenerateError(
                    f"--batching {batching} cannot be used with VACE (--control-video, --ref-image, --first-frame, "
                    f"--last-frame): {problem}; use --batching {CONDITIONED_BATCHING} or auto"
                )
            batching = CONDITIONED_BATCHING
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


def _round16(x: float) -> int:
    return max(RESOLUTION_MULTIPLE, round(x / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)
