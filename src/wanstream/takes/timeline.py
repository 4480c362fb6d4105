"""A take as a Scope timeline (v2.1): its prompt changes at the times they were applied, for use in Scope.

A timeline is coarser than the log: prompts by wall-clock time rather than by chunk, and one settings block
(the take's at its start; later seed, steps or noise changes are not in a Scope timeline's vocabulary). It
is for carrying a performance to Scope; `wanstream replay` is the exact one.
"""

from __future__ import annotations

from typing import Any

from wanstream.engine.prompts import WeightedPrompt
from wanstream.engine.settings import StreamSettings
from wanstream.takes.log import TakeLog
from wanstream.timeline import LoraSetting, Segment, Timeline, TimelineSettings

MIN_LAST_SEGMENT_S = 0.25  # a prompt applied just before the end still gets a segment Scope can play


def timeline_of(log: TakeLog) -> Timeline:
    """The take's prompt changes (from its first output frame on) as timeline segments, in seconds from the
    take's start; settings from the stream's settings at the take's start."""
    first = _take_start(log)  # the call that made the take's first frame
    start = log.ops[first].time if log.first_output else log.ops[0].time
    settings = StreamSettings.model_validate(log.settings)
    rows: list[tuple[float, tuple[WeightedPrompt, ...], dict[str, Any]]] = []
    for op in log.ops:
        if op.target != "session":
            continue
        if op.name == "update" and op.index < first:
            settings = _updated(settings, op.args["update"])
        if op.name not in ("set_prompts", "set_prompt_embeddings"):
            continue
        at = 0.0 if op.index < first else op.time - start  # what was set before the take is in force at 0
        rows.append((at, _prompts(op.args), (op.args.get("transition") or {}) if at > 0 else {}))
    if not rows:
        raise ValueError(
            "the take has no prompts (a stream conditioned on embeddings only cannot be a timeline)"
        )
    rows[0] = (
        0.0,
        rows[0][1],
        {},
    )  # the prompt in force when the take starts (set just before its first frame)
    end = max(log.ops[-1].time - start, rows[-1][0] + MIN_LAST_SEGMENT_S)
    segments = []
    for i, (t, items, transition) in enumerate(rows):
        until = rows[i + 1][0] if i + 1 < len(rows) else end
        if until <= t:
            continue  # two changes in one instant: the later one wins
        segments.append(
            Segment(
                start=round(t, 3),
                end=round(until, 3),
                prompts=items,
                transition_steps=transition.get("steps", 4) if transition else None,
                interpolation=transition.get("method") if transition else None,
            )
        )
    return Timeline(tuple(segments), _settings(settings), source="session log")


def _take_start(log: TakeLog) -> int:
    """The index of the call that made the take's first output frame (0 for a take from the stream's start)."""
    if not log.first_output:
        return 0
    for op in log.ops:
        if op.outputs and op.first_output + op.outputs > log.first_output:
            return op.index
    return len(log.ops) - 1


def _prompts(args: dict[str, Any]) -> tuple[WeightedPrompt, ...]:
    if "embeddings" in args:
        return (WeightedPrompt(text=str(args.get("label") or "<embeddings>")),)
    given = args["prompts"]
    items = given if isinstance(given, list) else [given]
    return tuple(
        WeightedPrompt(text=p) if isinstance(p, str) else WeightedPrompt.model_validate(p) for p in items
    )


def _updated(settings: StreamSettings, update: dict[str, Any]) -> StreamSettings:
    return StreamSettings.model_validate({**settings.model_dump(), **update})


def _settings(s: StreamSettings) -> TimelineSettings:
    return TimelineSettings(
        pipeline_id="streamdiffusionv2",
        input_mode=s.mode,
        height=s.height,
        width=s.width,
        seed=s.seed,
        denoising_steps=tuple(s.denoising_steps),
        noise_scale=s.noise_scale,
        noise_controller=s.noise_controller,
        manage_cache=s.prompt_switch == "cut",
        loras=tuple(LoraSetting(path=lo.path, scale=lo.scale, merge_mode=lo.mode) for lo in s.loras) or None,
        lora_merge_strategy=s.lora_mode,
    )
