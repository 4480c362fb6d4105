"""`generate --extend-prompts`: every prompt of a timeline extended once, before the video model loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from wanstream.engine.prompts import WeightedPrompt
from wanstream.prompting.extend import Extension, PromptExtender
from wanstream.timeline import Timeline


def extend_timeline(
    timeline: Timeline,
    extender: PromptExtender,
    *,
    seed: int,
    on_extended: Callable[[Extension], None] | None = None,
) -> tuple[Timeline, tuple[dict[str, Any], ...]]:
    """The timeline with each prompt text replaced by its extension (a text used by several segments is
    extended once), and one record per segment prompt for the run's statistics."""
    done: dict[str, Extension] = {}
    records: list[dict[str, Any]] = []
    segments = []
    for index, segment in enumerate(timeline.segments):
        prompts = []
        for prompt in segment.prompts:
            ext = done.get(prompt.text)
            if ext is None:
                ext = done[prompt.text] = extender.extend(prompt.text, seed=seed)
                if on_extended is not None:
                    on_extended(ext)
            prompts.append(WeightedPrompt(text=ext.text, weight=prompt.weight))
            records.append(
                {
                    "segment": index,
                    "prompt": prompt.text,
                    "extended": ext.text,
                    "weight": prompt.weight,
                    "model": ext.model,
                    "seed": ext.seed,
                    "umt5_tokens": ext.umt5_tokens,
                    "truncated": ext.truncated,
                    "cached": ext.cached,
                }
            )
        segments.append(dataclasses.replace(segment, prompts=tuple(prompts)))
    return dataclasses.replace(timeline, segments=tuple(segments)), tuple(records)
