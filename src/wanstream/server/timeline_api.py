"""Timeline routes for the studio: read a Scope timeline file, write one back.

The studio keeps timelines in one plain form (`StudioTimeline`: seconds, prompts, transition, settings)
and lets the server do both conversions with `wanstream.timeline`, so a file the studio imports is read
exactly as `wanstream generate --timeline` reads it, and a file it exports is one that command accepts.

    POST /api/v1/timeline/parse?name=show.json   body: the file (v2.0/v2.1 or workflow JSON)
        → StudioTimeline, or 422 {"error": ..., "problems": [{"loc", "msg"}]}
    POST /api/v1/timeline/export                 body: StudioTimeline
        → Scope timeline v2.1 JSON, or 422 with the problems
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from wanstream.engine.prompts import Interpolation, WeightedPrompt
from wanstream.timeline import (
    Segment,
    Timeline,
    TimelineError,
    TimelineSettings,
    parse_timeline,
)

router = APIRouter(prefix="/api/v1/timeline", tags=["timeline"])

MAX_TIMELINE_BYTES = 2 * 1024 * 1024  # a timeline is text; hours of segments fit in far less
MAX_SEGMENTS = 10_000  # a prompt change every second for almost three hours
MAX_SEGMENT_PROMPTS = 8


# Segment and settings fields beyond the core ones (e.g. a VACE scale) pass through by their names in
# `wanstream.timeline`, so a field added there reaches the studio's files without a change here.
SEGMENT_FIELDS = frozenset(f.name for f in dataclasses.fields(Segment))
SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(TimelineSettings))


class StudioSegment(BaseModel):
    model_config = ConfigDict(extra="allow")

    start: float = Field(..., description="Seconds from the timeline's start.")
    end: float | None = Field(..., description="Seconds; null for an open-ended last segment.")
    prompts: list[WeightedPrompt] = Field(..., min_length=1, max_length=MAX_SEGMENT_PROMPTS)
    transition_steps: int | None = Field(
        None, description="Blend into this segment over this many chunks (0 or null: switch at once)."
    )
    interpolation: Interpolation | None = Field(None, description="The blend's method: linear or slerp.")


class StudioTimeline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segments: list[StudioSegment] = Field(..., min_length=1, max_length=MAX_SEGMENTS)
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="`wanstream.timeline.TimelineSettings` fields (seed, denoising_steps, noise_scale, "
        "noise_controller, manage_cache, input_mode, height, width, ...); absent or null = not set.",
    )
    source: str = Field("", description="Where it came from (a file name), for messages.")
    duration: float | None = Field(None, description="End of the last segment (null: open-ended).")
    stream_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="The live settings this timeline sets (what `wanstream generate` applies from it): "
        "seed, steps, noise_scale, noise_controller, mode, prompt_switch. Output only.",
    )


def to_studio(timeline: Timeline) -> StudioTimeline:
    segments = []
    for s in timeline.segments:
        extra = {
            f: getattr(s, f)
            for f in SEGMENT_FIELDS - {"start", "end", "prompts"}
            if getattr(s, f) is not None
        }
        end = s.end if math.isfinite(s.end) else None
        segments.append(StudioSegment(start=s.start, end=end, prompts=list(s.prompts), **extra))
    settings = {k: v for k, v in dataclasses.asdict(timeline.settings).items() if v is not None}
    return StudioTimeline(
        segments=segments,
        settings=settings,
        source=timeline.source,
        duration=timeline.duration if math.isfinite(timeline.duration) else None,
        stream_settings=timeline.settings.to_update().model_dump(mode="json", exclude_unset=True),
    )


def from_studio(studio: StudioTimeline) -> Timeline:
    """The internal timeline (raises TimelineError with located problems)."""
    source = studio.source or "timeline"
    problems = [(f"settings.{k}", "unknown setting") for k in sorted(set(studio.settings) - SETTINGS_FIELDS)]
    segments = []
    for i, seg in enumerate(studio.segments):
        extra = dict(seg.model_extra or {})
        problems += [(f"segments[{i}].{k}", "unknown field") for k in sorted(set(extra) - SEGMENT_FIELDS)]
        fields = {k: getattr(seg, k) for k in ("transition_steps", "interpolation")}
        end = math.inf if seg.end is None else seg.end
        segments.append((seg.start, end, tuple(seg.prompts), {**extra, **fields}))
    known = {k: v for k, v in studio.settings.items() if k in SETTINGS_FIELDS}
    settings: TimelineSettings | None = None
    try:
        # Each value checked against its field's type (strictly: `true` is no seed), nested LoRAs too.
        settings = _SETTINGS.validate_json(json.dumps(known, allow_nan=False), strict=True)
    except ValidationError as exc:
        problems += [(_loc("settings", e["loc"]), e["msg"]) for e in exc.errors()]
    except ValueError as exc:  # NaN or infinity: not JSON
        problems.append(("settings", str(exc)))
    if problems or settings is None:
        raise TimelineError(source, problems)
    try:
        return Timeline(
            tuple(Segment(start, end, prompts, **rest) for start, end, prompts, rest in segments),
            settings,
            source=source,
        )
    except TypeError as exc:  # a value of the wrong kind (the file's own validation names the rest)
        raise TimelineError(source, [("", f"malformed timeline: {exc}")]) from None


_SETTINGS = TypeAdapter(TimelineSettings)


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    return prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _problems(exc: TimelineError) -> dict[str, Any]:
    return {"error": str(exc), "problems": [{"loc": loc, "msg": msg} for loc, msg in exc.problems]}


@router.post("/parse")
async def parse(request: Request, name: Annotated[str, Query(max_length=256)] = "timeline") -> StudioTimeline:
    """Read a Scope timeline file (v2.0/v2.1 export or `.scope-workflow.json`), as `wanstream generate`
    reads it; the body is the file itself."""
    raw = await request.body()
    if len(raw) > MAX_TIMELINE_BYTES:
        raise HTTPException(413, f"a timeline file is at most {MAX_TIMELINE_BYTES} bytes")
    try:
        return to_studio(parse_timeline(raw, source=name))
    except TimelineError as exc:
        raise HTTPException(422, _problems(exc)) from None


@router.post("/export")
async def export(body: StudioTimeline) -> dict[str, Any]:
    """The studio's timeline as a Scope timeline v2.1 object (what `wanstream generate --timeline` and
    Scope import). Every segment needs an end time."""
    try:
        scope = from_studio(body).to_scope()
        # Read it back as `wanstream generate` will: settings the engine rejects (a seed below 0, steps out
        # of order) fail here, named in the file's own spelling, instead of in the user's later run.
        parse_timeline(scope, source="the exported timeline")
    except TimelineError as exc:
        raise HTTPException(422, _problems(exc)) from None
    return scope
