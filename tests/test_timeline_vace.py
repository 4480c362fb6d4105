"""Timelines: `vace_context_scale` on segments and in settings — the three forms, range checks, export."""

from __future__ import annotations

import json
import math

import pytest

from wanstream.engine.prompts import WeightedPrompt
from wanstream.timeline import Segment, Timeline, TimelineError, TimelineSettings, parse_timeline


def v2(**settings) -> dict:
    return {
        "version": "2.1",
        "prompts": [
            {"startTime": 0, "endTime": 2, "prompts": [{"text": "a cat"}], "vace_context_scale": 0.5},
            {"startTime": 2, "endTime": 4, "prompts": [{"text": "a dog"}], "vaceContextScale": 2},
            {"startTime": 4, "endTime": 5, "prompts": [{"text": "a bird"}]},
        ],
        "settings": settings,
    }


def test_v2_and_workflow_read_the_scale_per_segment_and_globally() -> None:
    tl = parse_timeline(v2(vace_context_scale=1.25))
    assert [s.vace_context_scale for s in tl.segments] == [0.5, 2.0, None]
    assert tl.settings.vace_context_scale == 1.25
    assert parse_timeline(v2(vaceContextScale=0)).settings.vace_context_scale == 0.0
    assert parse_timeline(v2()).settings.vace_context_scale is None
    workflow = {
        "format": "scope-workflow",
        "pipelines": [{"pipeline_id": "streamdiffusionv2", "params": {"vace_context_scale": 0.75}}],
        "timeline": {
            "entries": [
                {"start_time": 0, "end_time": 1, "prompts": [{"text": "a"}], "vace_context_scale": 1.5},
                {"start_time": 1, "end_time": 2, "prompts": [{"text": "b"}]},
            ]
        },
    }
    wf = parse_timeline(workflow)
    assert wf.settings.vace_context_scale == 0.75
    assert [s.vace_context_scale for s in wf.segments] == [1.5, None]
    # Not an engine setting: the session's settings update leaves it out.
    assert "vace_context_scale" not in tl.settings.to_update().model_dump(exclude_unset=True)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {
                "prompts": [
                    {"startTime": 0, "endTime": 1, "prompts": [{"text": "a"}], "vace_context_scale": 2.5}
                ]
            },
            "prompts[0].vace_context_scale: must be ≤ 2 (got 2.5)",
        ),
        (
            {
                "prompts": [
                    {"startTime": 0, "endTime": 1, "prompts": [{"text": "a"}], "vaceContextScale": -0.1}
                ]
            },
            "prompts[0].vaceContextScale: must be ≥ 0 (got -0.1)",
        ),
        (
            {
                "prompts": [{"startTime": 0, "endTime": 1, "prompts": [{"text": "a"}]}],
                "settings": {"vace_context_scale": "1"},
            },
            "settings.vace_context_scale: must be a number",
        ),
        (
            {
                "format": "scope-workflow",
                "pipelines": [{"pipeline_id": "x", "params": {"vace_context_scale": 3}}],
                "prompts": [{"text": "a"}],
            },
            "pipelines[0].params.vace_context_scale: must be ≤ 2 (got 3)",
        ),
    ],
)
def test_out_of_range_scales_are_named(data: dict, expected: str) -> None:
    with pytest.raises(TimelineError) as err:
        parse_timeline(json.dumps(data), "t.json")
    assert expected in str(err.value)


def test_programmatic_timelines_check_the_range_too() -> None:
    cat = (WeightedPrompt(text="a cat"),)
    with pytest.raises(TimelineError, match=r"segments\[0\]\.vace_context_scale: must be in \[0, 2\]"):
        Timeline((Segment(0.0, math.inf, cat, vace_context_scale=math.nan),))
    with pytest.raises(TimelineError, match=r"settings\.vace_context_scale"):
        Timeline((Segment(0.0, 1.0, cat),), TimelineSettings(vace_context_scale=2.01))


def test_export_round_trip_keeps_the_scales() -> None:
    tl = parse_timeline(v2(vace_context_scale=1.25))
    data = tl.to_scope()
    assert data["settings"]["vace_context_scale"] == 1.25
    assert [p.get("vace_context_scale") for p in data["prompts"]] == [0.5, 2.0, None]
    assert parse_timeline(json.dumps(data)) == tl
