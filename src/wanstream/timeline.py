"""Scope timeline files: parse, validate, normalise, query and export.

Three forms are read, all into one `Timeline`:

* Scope timeline v2.0 / v2.1 (`prompts[{startTime, endTime, prompts[{text, weight}], transitionSteps?,
  temporalInterpolationMethod?}]`, `settings{pipelineId, inputMode, resolution, seed, denoisingSteps,
  noiseScale, noiseController, manageCache, ...}`, `version`, `exportedAt`);
* Scope workflows (`.scope-workflow.json`: `format: "scope-workflow"`, `timeline.entries[{start_time,
  end_time, prompts, transition_steps?, temporal_interpolation_method?}]`, settings in the main pipeline's
  `params`); a workflow without timeline entries but with top-level `prompts` is one open-ended segment.

VACE strength: `vace_context_scale` (Scope's parameter name; v2 files may spell it `vaceContextScale`), in
[0, 2], on a segment (while that segment is active) or in the settings (v2 `settings`, a workflow's main
pipeline `params`: the value while a segment without one is active).

Validation happens at this boundary, before anything heavy: a malformed file gets a `TimelineError` that
names the file, the field and its position in the file's own spelling (`prompts[2].endTime: must be >
startTime`). Unknown keys are ignored (Scope exports many).

Time rules (seconds from the start of the input video):

* Segments are in time order and do not overlap; gaps are allowed.
* The active segment at time t is the last one starting at or before t. The first segment is also active
  before its start (Scope applies the first prompt on import), and a segment stays active through a gap
  and after its end until the next one starts (Scope only submits prompts on entering a segment).
* For a video, prompts switch at the first input frame whose timestamp is ≥ the segment's startTime
  (`start_frames`); the engine applies a switch from the chunk that contains that frame.

Prompts are the engine's `WeightedPrompt`s and the limits are the engine's (weights in [0, 1000], at most
`MAX_STEPS` descending timesteps in (0, 1000], transitions of ≤ 256 chunks), so a timeline that parses is
one the engine accepts. Weights are kept as written (Scope examples use 100); the engine normalises them.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from wanstream.engine.prompts import Interpolation, Transition, WeightedPrompt
from wanstream.engine.settings import (
    MAX_LORA_SCALE,
    MAX_STEPS,
    LoraModeName,
    LoraSpec,
    Mode,
    SettingsUpdate,
)
from wanstream.media.frame import TIME_EPS

InputMode = Mode  # Scope's inputMode: "text" or "video"

PIPELINE_ID = "streamdiffusionv2"  # Scope's id for this pipeline (set it in settings when exporting)
EXPORT_VERSION = "2.1"
MAX_WEIGHT = 1000.0  # the engine's WeightedPrompt bound
MAX_TRANSITION = 256  # the engine's Transition bound (chunks)
MAX_SEED = 2**63 - 1
MAX_VACE_SCALE = 2.0  # Scope's vace_context_scale range is [0, 2]


class TimelineError(ValueError):
    """A timeline that cannot be used; `problems` lists (location, message) pairs."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = [f"{loc}: {msg}" if loc else msg for loc, msg in self.problems[:10]]
        if len(self.problems) > 10:
            lines.append(f"... and {len(self.problems) - 10} more problems")
        head = f"{source}: " if source else ""
        super().__init__(head + ("\n  " if len(lines) > 1 else "") + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------------------
# The internal timeline


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float  # seconds; math.inf for an open-ended segment
    prompts: tuple[WeightedPrompt, ...]
    transition_steps: int | None = None  # None: the pipeline's default (0 for StreamDiffusionV2: a hard cut)
    interpolation: Interpolation | None = None  # temporal method of the transition; None: pipeline default
    vace_context_scale: float | None = (
        None  # VACE strength while this segment is active; None: the base value
    )

    @property
    def transition(self) -> Transition | None:
        """How to enter this segment: a blend over `transition_steps` chunks, or None for a plain switch."""
        if not self.transition_steps:
            return None
        if self.interpolation is None:
            return Transition(steps=self.transition_steps)
        return Transition(steps=self.transition_steps, method=self.interpolation)


@dataclass(frozen=True)
class LoraSetting:
    path: str
    scale: float = 1.0
    merge_mode: LoraModeName | None = None  # as the file names it (engine.settings maps Scope's names)


@dataclass(frozen=True)
class TimelineSettings:
    """Settings saved with a timeline; None means "not set" (the command line or the defaults decide)."""

    pipeline_id: str | None = None
    input_mode: InputMode | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    denoising_steps: tuple[int, ...] | None = None
    noise_scale: float | None = None
    noise_controller: bool | None = None
    manage_cache: bool | None = None
    quantization: str | None = None
    kv_cache_attention_bias: float | None = None
    loras: tuple[LoraSetting, ...] | None = None  # None when there are none
    lora_merge_strategy: LoraModeName | None = None
    vace_context_scale: float | None = None  # Scope's VACE strength in [0, 2] (None: 1.0 or the command line)

    def to_update(self) -> SettingsUpdate:
        """The engine settings this timeline sets: seed, steps, noise scale and controller, mode, and
        `prompt_switch` from manageCache (Scope resets the cache on a plain prompt change only with cache
        management on: True → "cut", False → "refresh"; its LoRA scale changes likewise, so `lora_switch`
        follows it too), and the LoRAs with their merge strategy. Resolution is left out: the caller chooses
        between the input video's and this one and rounds it to a multiple of 16."""
        switch = None if self.manage_cache is None else ("cut" if self.manage_cache else "refresh")
        fields = {
            "seed": self.seed,
            "steps": self.denoising_steps,
            "noise_scale": self.noise_scale,
            "noise_controller": self.noise_controller,
            "mode": self.input_mode,
            "prompt_switch": switch,
            "lora_switch": switch,
            "loras": tuple(LoraSpec(path=lo.path, scale=lo.scale, mode=lo.merge_mode) for lo in self.loras)
            if self.loras
            else None,
            "lora_mode": self.lora_merge_strategy,
        }
        return SettingsUpdate(**{k: v for k, v in fields.items() if v is not None})


@dataclass(frozen=True)
class Timeline:
    segments: tuple[Segment, ...]
    settings: TimelineSettings = field(default_factory=TimelineSettings)
    source: str = field(default="", compare=False)  # where it came from, for messages

    def __post_init__(self) -> None:
        problems = _check_segment_times(
            [(s.start, s.end) for s in self.segments], "segments", "start", "end", open_end_ok=True
        )
        for i, seg in enumerate(self.segments):
            if not seg.prompts:
                problems.append((f"segments[{i}].prompts", "must not be empty"))
            if any(not isinstance(p, WeightedPrompt) for p in seg.prompts):
                problems.append((f"segments[{i}].prompts", "must be WeightedPrompt objects"))
            if seg.transition_steps is not None and not 0 <= seg.transition_steps <= MAX_TRANSITION:
                problems.append((f"segments[{i}].transition_steps", f"must be in [0, {MAX_TRANSITION}]"))
            if seg.vace_context_scale is not None and not _valid_vace_scale(seg.vace_context_scale):
                problems.append((f"segments[{i}].vace_context_scale", f"must be in [0, {MAX_VACE_SCALE:g}]"))
        if self.settings.vace_context_scale is not None and not _valid_vace_scale(
            self.settings.vace_context_scale
        ):
            problems.append(("settings.vace_context_scale", f"must be in [0, {MAX_VACE_SCALE:g}]"))
        if problems:
            raise TimelineError(self.source, problems)

    @classmethod
    def constant(
        cls, prompts: Sequence[str | WeightedPrompt], settings: TimelineSettings | None = None
    ) -> Timeline:
        """One open-ended segment with these prompts (e.g. from `--prompt` on the command line)."""
        items: list[WeightedPrompt] = []
        problems: list[tuple[str, str]] = []
        for i, p in enumerate(prompts):
            try:
                items.append(p if isinstance(p, WeightedPrompt) else WeightedPrompt(text=p))
            except ValidationError as exc:
                problems += [(_loc(("prompts", i, *e["loc"])), _message(e)) for e in exc.errors()]
        if problems:
            raise TimelineError("", problems)
        return cls((Segment(0.0, math.inf, tuple(items)),), settings or TimelineSettings())

    @property
    def duration(self) -> float:
        """End of the last segment (math.inf if it is open-ended)."""
        return self.segments[-1].end

    def index_at(self, t: float) -> int:
        """Index of the segment active at time t (see the module's time rules)."""
        starts = [s.start for s in self.segments]
        return max(0, bisect.bisect_right(starts, t + TIME_EPS) - 1)

    def segment_at(self, t: float) -> Segment:
        return self.segments[self.index_at(t)]

    def start_frames(self, timestamps: Sequence[float]) -> list[int]:
        """For each segment, the index of the first frame whose timestamp is ≥ its start.

        `timestamps` are the input frames' presentation times in seconds, non-decreasing (as `VideoReader`
        gives them). The first segment starts at frame 0; a segment that begins after the last frame gets
        `len(timestamps)`; when two segments begin within one frame interval the later one wins that frame.
        """
        times = [float(t) for t in timestamps]
        return [0] + [bisect.bisect_left(times, s.start - TIME_EPS) for s in self.segments[1:]]

    def frame_segments(self, timestamps: Sequence[float]) -> list[int]:
        """The index of the active segment for each frame (consistent with `start_frames`)."""
        starts = self.start_frames(timestamps)
        return [bisect.bisect_right(starts, i) - 1 for i in range(len(timestamps))]

    def to_scope(self, exported_at: datetime | None = None) -> dict[str, Any]:
        """This timeline as a Scope timeline v2.1 object (what Scope's exporter writes)."""
        problems = [
            (f"segments[{i}].end", "is open-ended; give it an end time before exporting")
            for i, s in enumerate(self.segments)
            if not math.isfinite(s.end)
        ]
        if problems:
            raise TimelineError(self.source, problems)
        segments = []
        for s in self.segments:
            item: dict[str, Any] = {
                "startTime": s.start,
                "endTime": s.end,
                "prompts": [{"text": p.text, "weight": p.weight} for p in s.prompts],
            }
            if s.transition_steps is not None:
                item["transitionSteps"] = s.transition_steps
            if s.interpolation is not None:
                item["temporalInterpolationMethod"] = s.interpolation
            if s.vace_context_scale is not None:
                item["vace_context_scale"] = s.vace_context_scale
            segments.append(item)
        when = (exported_at or datetime.now(UTC)).astimezone(UTC)
        return {
            "prompts": segments,
            "settings": _settings_to_scope(self.settings),
            "version": EXPORT_VERSION,
            "exportedAt": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }

    def to_json(self, exported_at: datetime | None = None) -> str:
        return json.dumps(self.to_scope(exported_at), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike[str], exported_at: datetime | None = None) -> Path:
        """Write as Scope timeline v2.1 JSON (atomically: a temp file renamed into place)."""
        path = Path(path)
        text = self.to_json(exported_at)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path


def _settings_to_scope(s: TimelineSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s.pipeline_id is not None:
        out["pipelineId"] = s.pipeline_id
    if s.input_mode is not None:
        out["inputMode"] = s.input_mode
    if s.height is not None and s.width is not None:
        out["resolution"] = {"height": s.height, "width": s.width}
    pairs = [
        ("seed", s.seed),
        ("denoisingSteps", list(s.denoising_steps) if s.denoising_steps is not None else None),
        ("noiseScale", s.noise_scale),
        ("noiseController", s.noise_controller),
        ("manageCache", s.manage_cache),
        ("quantization", s.quantization),
        ("kvCacheAttentionBias", s.kv_cache_attention_bias),
        ("loraMergeStrategy", s.lora_merge_strategy),
        ("vace_context_scale", s.vace_context_scale),
    ]
    out.update({k: v for k, v in pairs if v is not None})
    if s.loras:
        out["loras"] = [
            {"path": lo.path, "scale": lo.scale, **({"mergeMode": lo.merge_mode} if lo.merge_mode else {})}
            for lo in s.loras
        ]
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_timeline(path: str | os.PathLike[str]) -> Timeline:
    """Read a Scope timeline (v2.0/v2.1) or workflow file; raises TimelineError naming what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TimelineError(str(path), [("", "no such file")]) from None
    except IsADirectoryError:
        raise TimelineError(str(path), [("", "is a folder, not a timeline file")]) from None
    except UnicodeDecodeError:
        raise TimelineError(str(path), [("", "not a text file (a timeline is UTF-8 JSON)")]) from None
    except OSError as exc:
        raise TimelineError(str(path), [("", f"cannot read ({exc.strerror})")]) from None
    return parse_timeline(text, source=str(path))


def parse_timeline(data: str | bytes | Mapping[str, Any], source: str = "timeline") -> Timeline:
    """Parse JSON text (or an already decoded object) in any of the three forms."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno}"
            raise TimelineError(source, [("", f"not valid JSON ({exc.msg} at {where})")]) from None
    if not isinstance(data, Mapping):
        raise TimelineError(source, [("", f"must be a JSON object, got {_json_type(data)}")])
    if "format" in data:
        if data["format"] != "scope-workflow":
            raise TimelineError(
                source, [("format", f"unknown format {data['format']!r} (expected 'scope-workflow')")]
            )
        return _from_workflow(data, source)
    if "timeline" in data:  # a workflow that lost its "format" key
        return _from_workflow(data, source)
    if "prompts" in data:
        return _from_v2(data, source)
    raise TimelineError(
        source,
        [
            (
                "",
                "not a Scope timeline: expected a 'prompts' list (timeline v2.x) or 'format': 'scope-workflow'",
            )
        ],
    )


def _from_v2(data: Mapping[str, Any], source: str) -> Timeline:
    wire = _validate(_TimelineV2, data, source)
    problems = _check_segment_times(
        [(s.startTime, s.endTime) for s in wire.prompts], "prompts", "startTime", "endTime"
    )
    if problems:
        raise TimelineError(source, problems)
    segments = tuple(
        Segment(
            s.startTime,
            s.endTime,
            _prompts(s.prompts),
            s.transitionSteps,
            s.temporalInterpolationMethod,
            s.vace_context_scale,
        )
        for s in wire.prompts
    )
    st = wire.settings or _SettingsV2()
    settings = TimelineSettings(
        pipeline_id=st.pipelineId,
        input_mode=st.inputMode,
        height=st.resolution.height if st.resolution else None,
        width=st.resolution.width if st.resolution else None,
        seed=st.seed,
        denoising_steps=tuple(st.denoisingSteps) if st.denoisingSteps is not None else None,
        noise_scale=st.noiseScale,
        noise_controller=st.noiseController,
        manage_cache=st.manageCache,
        quantization=st.quantization,
        kv_cache_attention_bias=st.kvCacheAttentionBias,
        loras=tuple(LoraSetting(lo.path, lo.scale, lo.mergeMode) for lo in st.loras or ()) or None,
        lora_merge_strategy=st.loraMergeStrategy,
        vace_context_scale=st.vace_context_scale,
    )
    version = f"Scope timeline v{wire.version}" if wire.version else "Scope timeline"
    return Timeline(segments, settings, source=f"{source} ({version})")


def _from_workflow(data: Mapping[str, Any], source: str) -> Timeline:
    wire = _validate(_Workflow, data, source)
    entries = wire.timeline.entries if wire.timeline else []
    if entries:
        problems = _check_segment_times(
            [(e.start_time, e.end_time) for e in entries], "timeline.entries", "start_time", "end_time"
        )
        if problems:
            raise TimelineError(source, problems)
        segments = tuple(
            Segment(
                e.start_time,
                e.end_time,
                _prompts(e.prompts),
                e.transition_steps,
                e.temporal_interpolation_method,
                e.vace_context_scale,
            )
            for e in entries
        )
    elif wire.prompts:
        segments = (Segment(0.0, math.inf, _prompts(wire.prompts)),)
    else:
        raise TimelineError(
            source, [("timeline.entries", "no timeline entries and no 'prompts' in the workflow")]
        )

    settings = TimelineSettings()
    if wire.pipelines:
        main = next((p for p in wire.pipelines if p.role == "main"), wire.pipelines[0])
        pp = main.params
        steps = pp.denoising_step_list if pp.denoising_step_list is not None else pp.denoising_steps
        settings = TimelineSettings(
            pipeline_id=main.pipeline_id,
            input_mode=pp.input_mode,
            height=pp.height if pp.width is not None else None,
            width=pp.width if pp.height is not None else None,
            seed=pp.base_seed if pp.base_seed is not None else pp.seed,
            denoising_steps=tuple(steps) if steps is not None else None,
            noise_scale=pp.noise_scale,
            noise_controller=pp.noise_controller,
            manage_cache=pp.manage_cache,
            quantization=pp.quantization,
            kv_cache_attention_bias=pp.kv_cache_attention_bias,
            loras=tuple(LoraSetting(lo.filename, lo.weight, lo.merge_mode) for lo in main.loras) or None,
            lora_merge_strategy=main.loras[0].merge_mode if main.loras else None,
            vace_context_scale=pp.vace_context_scale,
        )
    return Timeline(segments, settings, source=f"{source} (Scope workflow)")


def _valid_vace_scale(value: float) -> bool:
    return 0.0 <= value <= MAX_VACE_SCALE  # False for NaN too


def _prompts(items: Sequence[_Prompt]) -> tuple[WeightedPrompt, ...]:
    return tuple(WeightedPrompt(text=p.text, weight=p.weight) for p in items)


def _check_segment_times(
    spans: Sequence[tuple[float, float]], where: str, start: str, end: str, open_end_ok: bool = False
) -> list[tuple[str, str]]:
    """Problems with segment times, located in the form's own field names."""
    problems: list[tuple[str, str]] = []
    if not spans:
        return [(where, "must contain at least one segment")]
    for i, (s, e) in enumerate(spans):
        if not (math.isfinite(s) and s >= 0):
            problems.append((f"{where}[{i}].{start}", f"must be a finite number ≥ 0 (got {s})"))
        if math.isnan(e) or (math.isinf(e) and not open_end_ok):
            problems.append((f"{where}[{i}].{end}", f"must be a finite number (got {e})"))
        elif e <= s:
            problems.append((f"{where}[{i}].{end}", f"must be > {start} (got {e} ≤ {s})"))
        if math.isinf(e) and i + 1 < len(spans):
            problems.append((f"{where}[{i}].{end}", "only the last segment may be open-ended"))
        if i > 0:
            ps, pe = spans[i - 1]
            if s < ps:
                problems.append(
                    (
                        f"{where}[{i}].{start}",
                        f"segments must be in time order; {where}[{i - 1}] starts later ({ps})",
                    )
                )
            elif s < pe - TIME_EPS:
                problems.append(
                    (f"{where}[{i}].{start}", f"overlaps {where}[{i - 1}], which ends at {pe} (got {s})")
                )
    return problems


# ---------------------------------------------------------------------------------------------------------
# Wire formats (pydantic). Strict types: "3" is not a number. Unknown keys are ignored.


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _not_blank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("blank", "must not be empty")
    return text


def _step_list(steps: list[int] | None) -> list[int] | None:
    if steps is None:
        return None
    if not 1 <= len(steps) <= MAX_STEPS:
        raise PydanticCustomError("step_count", "must list 1 to {most} timesteps", {"most": MAX_STEPS})
    if any(not 0 < s <= 1000 for s in steps):
        raise PydanticCustomError("step_range", "each timestep must be in (0, 1000]")
    if any(a <= b for a, b in itertools.pairwise(steps)):
        raise PydanticCustomError("step_order", "must be strictly decreasing")
    return steps


class _Prompt(_Wire):
    text: str
    weight: float = Field(default=1.0, ge=0, le=MAX_WEIGHT, allow_inf_nan=False)

    check_text = field_validator("text")(_not_blank)


Seconds = Annotated[float, Field(allow_inf_nan=False)]
VaceScale = Annotated[float, Field(ge=0, le=MAX_VACE_SCALE, allow_inf_nan=False)]
# Scope's parameter name; the camelCase spelling of the v2 files' other keys is accepted too.
_VACE_SCALE_NAMES = AliasChoices("vace_context_scale", "vaceContextScale")


class _SegmentV2(_Wire):
    startTime: Seconds
    endTime: Seconds
    prompts: list[_Prompt] = Field(min_length=1)
    transitionSteps: int | None = Field(default=None, ge=0, le=MAX_TRANSITION)
    temporalInterpolationMethod: Interpolation | None = None
    vace_context_scale: VaceScale | None = Field(default=None, validation_alias=_VACE_SCALE_NAMES)


class _Resolution(_Wire):
    height: int = Field(ge=1)
    width: int = Field(ge=1)


LoraScale = Annotated[float, Field(ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)]


class _LoraV2(_Wire):
    path: str
    scale: LoraScale = 1.0
    mergeMode: LoraModeName | None = None

    check_path = field_validator("path")(_not_blank)


class _SettingsV2(_Wire):
    pipelineId: str | None = None
    inputMode: InputMode | None = None
    resolution: _Resolution | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    denoisingSteps: list[int] | None = None
    noiseScale: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    noiseController: bool | None = None
    manageCache: bool | None = None
    quantization: str | None = None
    kvCacheAttentionBias: float | None = Field(default=None, allow_inf_nan=False)
    loras: list[_LoraV2] | None = None
    loraMergeStrategy: LoraModeName | None = None
    vace_context_scale: VaceScale | None = Field(default=None, validation_alias=_VACE_SCALE_NAMES)

    check_steps = field_validator("denoisingSteps")(_step_list)


class _TimelineV2(_Wire):
    prompts: list[_SegmentV2]
    settings: _SettingsV2 | None = None
    version: str | None = None
    exportedAt: str | None = None


class _Entry(_Wire):
    start_time: Seconds
    end_time: Seconds
    prompts: list[_Prompt] = Field(min_length=1)
    transition_steps: int | None = Field(default=None, ge=0, le=MAX_TRANSITION)
    temporal_interpolation_method: Interpolation | None = None
    vace_context_scale: VaceScale | None = None


class _WorkflowTimeline(_Wire):
    entries: list[_Entry] = Field(default_factory=list)


class _Params(_Wire):
    height: int | None = Field(default=None, ge=1)
    width: int | None = Field(default=None, ge=1)
    base_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    denoising_step_list: list[int] | None = None
    denoising_steps: list[int] | None = None
    noise_scale: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    noise_controller: bool | None = None
    manage_cache: bool | None = None
    input_mode: InputMode | None = None
    quantization: str | None = None
    kv_cache_attention_bias: float | None = Field(default=None, allow_inf_nan=False)
    vace_context_scale: VaceScale | None = None

    check_steps = field_validator("denoising_step_list", "denoising_steps")(_step_list)


class _LoraW(_Wire):
    filename: str
    weight: LoraScale = 1.0
    merge_mode: LoraModeName | None = None

    check_filename = field_validator("filename")(_not_blank)


class _Pipeline(_Wire):
    pipeline_id: str
    params: _Params = Field(default_factory=_Params)
    loras: list[_LoraW] = Field(default_factory=list)
    role: str | None = None


class _Workflow(_Wire):
    format: Literal["scope-workflow"] = "scope-workflow"
    format_version: str | None = None
    pipelines: list[_Pipeline] = Field(default_factory=list)
    timeline: _WorkflowTimeline | None = None
    prompts: list[_Prompt] | None = None


def _validate(model: type[_Wire], data: Mapping[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise TimelineError(source, [(_loc(e["loc"]), _message(e)) for e in exc.errors()]) from None


def _loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MESSAGES = {
    "missing": "required field is missing",
    "model_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "float_type": "must be a number",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "finite_number": "must be a finite number",
}


def _message(error: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _MESSAGES:
        msg = _MESSAGES[kind]
    elif kind == "greater_than_equal":
        msg = f"must be ≥ {_num(ctx['ge'])}"
    elif kind == "less_than_equal":
        msg = f"must be ≤ {_num(ctx['le'])}"
    elif kind == "too_short":
        msg = "must not be empty"
    elif kind == "value_error":
        msg = str(ctx.get("error", error["msg"]))
    elif kind == "literal_error":
        msg = f"must be {ctx['expected']}"
    else:
        msg = error["msg"]
    if kind != "missing" and "input" in error:
        msg += f" (got {_short(error['input'])})"
    return msg


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
