"""Scope timelines: the three file forms, validation messages, time queries, and export round trips."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from wanstream.engine.prompts import Transition, WeightedPrompt
from wanstream.timeline import (
    LoraSetting,
    Segment,
    Timeline,
    TimelineError,
    TimelineSettings,
    load_timeline,
    parse_timeline,
)

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("timeline-*.json"))

CAT = "A black cat walking through tall grass, soft sunlight, natural fur texture, photorealistic"
TIGER = "A tiger walking through tall grass, soft sunlight, natural fur texture, photorealistic"
LION = "A lion walking through tall grass, soft sunlight, natural fur texture, photorealistic"


def v20() -> dict[str, Any]:
    """A Scope v2.0 export, with the extra keys Scope's app may leave in."""
    return {
        "prompts": [
            {"startTime": 0, "endTime": 2.5, "prompts": [{"text": CAT, "weight": 100}], "color": "#f00"},
            {
                "startTime": 2.5,
                "endTime": 5.25,
                "prompts": [{"text": TIGER, "weight": 70}, {"text": LION, "weight": 30}],
                "transitionSteps": 4,
                "temporalInterpolationMethod": "slerp",
                "isLive": False,
            },
            {
                "startTime": 5.25,
                "endTime": 9,
                "prompts": [{"text": LION, "weight": 100}],
                "transitionSteps": 0,
            },
        ],
        "settings": {
            "pipelineId": "streamdiffusionv2",
            "resolution": {"height": 480, "width": 832},
            "seed": 42,
            "denoisingSteps": [700, 500],
            "noiseScale": 0.8,
            "noiseController": False,
            "manageCache": False,
            "negativeAttentionBias": 0.7,
        },
        "version": "2.0",
        "exportedAt": "2025-10-27T18:21:03.117Z",
    }


def v21() -> dict[str, Any]:
    data = v20()
    data["version"] = "2.1"
    data["settings"] |= {"inputMode": "video", "loras": [], "schemaFieldOverrides": {"vae_type": "wan"}}
    return data


def workflow() -> dict[str, Any]:
    """The same timeline as a .scope-workflow.json (main pipeline after a preprocessor)."""
    entries = [
        {
            "start_time": seg["startTime"],
            "end_time": seg["endTime"],
            "prompts": seg["prompts"],
            **({"transition_steps": seg["transitionSteps"]} if "transitionSteps" in seg else {}),
            **(
                {"temporal_interpolation_method": seg["temporalInterpolationMethod"]}
                if "temporalInterpolationMethod" in seg
                else {}
            ),
        }
        for seg in v20()["prompts"]
    ]
    return {
        "format": "scope-workflow",
        "format_version": "1.0",
        "metadata": {"name": "cats", "created_at": "2026-03-05T10:00:00Z", "scope_version": "0.2.4"},
        "pipelines": [
            {
                "pipeline_id": "depth",
                "source": {"type": "builtin"},
                "loras": [],
                "params": {},
                "role": "preprocessor",
            },
            {
                "pipeline_id": "streamdiffusionv2",
                "pipeline_version": "1.0.0",
                "source": {"type": "builtin"},
                "loras": [],
                "params": {
                    "height": 480,
                    "width": 832,
                    "base_seed": 42,
                    "denoising_step_list": [700, 500],
                    "noise_scale": 0.8,
                    "noise_controller": False,
                    "manage_cache": False,
                    "input_mode": "video",
                    "vace_enabled": False,
                },
                "role": "main",
            },
        ],
        "timeline": {"entries": entries},
        "prompts": [{"text": LION, "weight": 1.0}],
        "interpolation_method": "linear",
        "transition_steps": 0,
    }


def errors_of(data: Any, source: str = "t.json") -> str:
    with pytest.raises(TimelineError) as err:
        parse_timeline(data if isinstance(data, str) else json.dumps(data), source)
    assert str(err.value).startswith(f"{source}: ")
    return str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Forms


def test_every_example_parses() -> None:
    assert [p.name for p in EXAMPLES] == [
        "timeline-evolution.json",
        "timeline-feline.json",
        "timeline-prey.json",
    ]
    for path in EXAMPLES:
        tl = load_timeline(path)
        assert len(tl.segments) >= 4 and tl.segments[0].start == 0
        assert all(a.end == b.start for a, b in zip(tl.segments, tl.segments[1:]))  # contiguous
        assert all(len(p.text) > 200 for s in tl.segments for p in s.prompts)  # long, detailed prompts
        st = tl.settings
        assert (st.seed, st.denoising_steps, st.noise_scale) == (42, (700, 500), 0.8)
        assert (st.noise_controller, st.manage_cache, st.pipeline_id) == (False, False, "streamdiffusionv2")
        assert (st.height, st.width) == (480, 832)


def test_v20_v21_and_workflow_give_the_same_timeline() -> None:
    a, b, c = parse_timeline(v20()), parse_timeline(v21()), parse_timeline(workflow())
    assert b == c
    assert a == dataclasses.replace(b, settings=dataclasses.replace(b.settings, input_mode=None))
    assert b.segments[1] == Segment(
        2.5, 5.25, (WeightedPrompt(text=TIGER, weight=70), WeightedPrompt(text=LION, weight=30)), 4, "slerp"
    )
    assert b.settings == TimelineSettings(
        pipeline_id="streamdiffusionv2",
        input_mode="video",
        height=480,
        width=832,
        seed=42,
        denoising_steps=(700, 500),
        noise_scale=0.8,
        noise_controller=False,
        manage_cache=False,
    )
    assert "Scope timeline v2.0" in a.source and "Scope workflow" in c.source


def test_workflow_variants() -> None:
    # Older workflows: no roles (the first pipeline is the main one), `seed`, no `format` key.
    data = workflow()
    main = data["pipelines"].pop(1)
    main.pop("role")
    main["params"]["seed"] = main["params"].pop("base_seed")
    main["loras"] = [{"filename": "style.safetensors", "weight": 0.8, "merge_mode": "runtime_peft"}]
    data["pipelines"] = [main, data["pipelines"][0] | {"role": None}]
    del data["format"]
    tl = parse_timeline(data)
    assert tl.settings.seed == 42 and tl.settings.pipeline_id == "streamdiffusionv2"
    assert tl.settings.loras == (LoraSetting("style.safetensors", 0.8, "runtime_peft"),)
    assert tl.settings.lora_merge_strategy == "runtime_peft"
    # No timeline entries: the workflow's current prompts hold for the whole video.
    data = workflow()
    data["timeline"] = None
    tl = parse_timeline(data)
    assert tl.segments == (Segment(0.0, math.inf, (WeightedPrompt(text=LION, weight=1.0),)),)
    assert tl.index_at(1e6) == 0 and tl.duration == math.inf


def test_engine_settings_from_a_timeline() -> None:
    update = parse_timeline(v21()).settings.to_update()
    assert update.model_dump(exclude_unset=True) == {
        "seed": 42,
        "steps": (700, 500),
        "noise_scale": 0.8,
        "noise_controller": False,
        "mode": "video",
        "prompt_switch": "refresh",  # manageCache false: prompt changes keep the cache
        "lora_switch": "refresh",  # ... and so do LoRA scale changes
    }
    assert TimelineSettings(manage_cache=True).to_update().prompt_switch == "cut"
    assert TimelineSettings().to_update().model_dump(exclude_unset=True) == {}
    segments = parse_timeline(v20()).segments
    assert segments[0].transition is None and segments[2].transition is None  # 0 steps: a plain switch
    assert segments[1].transition == Transition(steps=4, method="slerp")


# ---------------------------------------------------------------------------------------------------------
# Validation


def mutate(
    change: Callable[[dict[str, Any]], None], base: Callable[[], dict[str, Any]] = v20
) -> dict[str, Any]:
    data = copy.deepcopy(base())
    change(data)
    return data


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change that sets `a.b[1].c` (or deletes it when value is ...)."""

    def change(data: dict[str, Any]) -> None:
        parts = [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".")]
        target = data
        for part in parts[:-1]:
            target = target[part]
        if value is ...:
            del target[parts[-1]]
        else:
            target[parts[-1]] = value

    return change


MALFORMED_V2 = [
    # overlaps, order and times
    ("prompts[1].startTime", 2.0, "prompts[1].startTime: overlaps prompts[0], which ends at 2.5"),
    ("prompts[2].startTime", 1.0, "prompts[2].startTime: segments must be in time order"),
    ("prompts[0].startTime", -1, "prompts[0].startTime: must be a finite number ≥ 0 (got -1.0)"),
    ("prompts[2].endTime", 5.25, "prompts[2].endTime: must be > startTime (got 5.25 ≤ 5.25)"),
    ("prompts[2].endTime", 4, "prompts[2].endTime: must be > startTime"),
    # missing fields
    ("prompts[1].endTime", ..., "prompts[1].endTime: required field is missing"),
    ("prompts[0].prompts", ..., "prompts[0].prompts: required field is missing"),
    ("prompts[1].prompts[0].text", ..., "prompts[1].prompts[0].text: required field is missing"),
    # wrong types
    ("prompts[0].startTime", "0", 'prompts[0].startTime: must be a number (got "0")'),
    ("prompts[0].startTime", True, "prompts[0].startTime: must be a number"),
    ("prompts[0].prompts", CAT, "prompts[0].prompts: must be a list"),
    ("prompts[1].prompts[0]", TIGER, "prompts[1].prompts[0]: must be an object"),
    ("prompts[1].prompts[0].text", 7, "prompts[1].prompts[0].text: must be a string"),
    ("prompts[1].transitionSteps", 2.5, "prompts[1].transitionSteps: must be an integer"),
    (
        "prompts[1].temporalInterpolationMethod",
        "cubic",
        "prompts[1].temporalInterpolationMethod: must be 'linear' or 'slerp'",
    ),
    ("settings", "fast", "settings: must be an object"),
    ("settings.seed", "42", "settings.seed: must be an integer"),
    ("settings.noiseController", "yes", "settings.noiseController: must be true or false"),
    ("settings.resolution.height", 0, "settings.resolution.height: must be ≥ 1"),
    ("settings.inputMode", "webcam", "settings.inputMode: must be 'video' or 'text'"),
    # empty prompts
    ("prompts", [], "prompts: must contain at least one segment"),
    ("prompts[1].prompts", [], "prompts[1].prompts: must not be empty"),
    ("prompts[1].prompts[1].text", "   ", "prompts[1].prompts[1].text: must not be empty"),
    # bad weights
    ("prompts[1].prompts[0].weight", -3, "prompts[1].prompts[0].weight: must be ≥ 0 (got -3)"),
    ("prompts[1].prompts[0].weight", 1e6, "prompts[1].prompts[0].weight: must be ≤ 1000"),
    ("prompts[1].prompts[0].weight", "heavy", "prompts[1].prompts[0].weight: must be a number"),
    # bad settings values
    ("settings.denoisingSteps", [500, 700], "settings.denoisingSteps: must be strictly decreasing"),
    ("settings.denoisingSteps", [1200, 500], "settings.denoisingSteps: each timestep must be in (0, 1000]"),
    ("settings.denoisingSteps", [], "settings.denoisingSteps: must list 1 to 8 timesteps"),
    ("settings.noiseScale", 1.5, "settings.noiseScale: must be ≤ 1"),
    ("settings.seed", -1, "settings.seed: must be ≥ 0"),
]


@pytest.mark.parametrize(("path", "value", "expected"), MALFORMED_V2, ids=[m[0] for m in MALFORMED_V2])
def test_malformed_v2_names_field_and_position(path: str, value: Any, expected: str) -> None:
    assert expected in errors_of(mutate(_set(path, value)))


def test_non_finite_numbers_are_rejected() -> None:
    # Python's json (and some exporters) accept NaN and Infinity literals.
    text = json.dumps(mutate(_set("prompts[1].prompts[0].weight", float("nan"))))
    assert "prompts[1].prompts[0].weight: must be a finite number" in errors_of(text)
    text = json.dumps(mutate(_set("prompts[2].endTime", float("inf"))))
    assert "prompts[2].endTime: must be a finite number" in errors_of(text)


def test_every_problem_is_reported_at_once() -> None:
    data = mutate(_set("prompts[1].prompts[0].weight", -1))
    _set("settings.noiseScale", 3)(data)
    message = errors_of(data)
    assert (
        "prompts[1].prompts[0].weight: must be ≥ 0" in message
        and "settings.noiseScale: must be ≤ 1" in message
    )


def test_malformed_workflows_use_their_own_field_names() -> None:
    cases = [
        ("timeline.entries[1].end_time", 1.0, "timeline.entries[1].end_time: must be > start_time"),
        (
            "timeline.entries[2].start_time",
            4.0,
            "timeline.entries[2].start_time: overlaps timeline.entries[1]",
        ),
        ("timeline.entries[0].prompts", [], "timeline.entries[0].prompts: must not be empty"),
        ("timeline.entries[0].start_time", ..., "timeline.entries[0].start_time: required field is missing"),
        (
            "pipelines[1].params.noise_scale",
            "high",
            'pipelines[1].params.noise_scale: must be a number (got "high")',
        ),
        (
            "pipelines[1].params.denoising_step_list",
            [1, 2],
            "pipelines[1].params.denoising_step_list: must be strictly decreasing",
        ),
        ("pipelines[1].pipeline_id", ..., "pipelines[1].pipeline_id: required field is missing"),
        ("timeline.entries", "soon", "timeline.entries: must be a list"),
        ("format", "comfy-workflow", "format: unknown format 'comfy-workflow'"),
    ]
    for path, value, expected in cases:
        assert expected in errors_of(mutate(_set(path, value), workflow)), path
    no_prompts = mutate(_set("timeline", {"entries": []}), workflow)
    del no_prompts["prompts"]
    assert "timeline.entries: no timeline entries and no 'prompts'" in errors_of(no_prompts)


def test_not_a_timeline() -> None:
    assert "not valid JSON" in errors_of('{"prompts": [')
    assert "line 1 column 14" in errors_of('{"prompts": [')
    assert "must be a JSON object, got a list" in errors_of("[1, 2]")
    assert "not a Scope timeline" in errors_of({"name": "my video"})
    assert "not valid JSON" in errors_of("")


def test_load_timeline_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(TimelineError, match=f"{missing}: no such file"):
        load_timeline(missing)
    with pytest.raises(TimelineError, match="is a folder"):
        load_timeline(tmp_path)
    binary = tmp_path / "clip.mp4"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(TimelineError, match=f"{binary}: not a text file"):
        load_timeline(binary)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mutate(_set("prompts[2].endTime", 1.0))))
    with pytest.raises(TimelineError, match=rf"{bad}: prompts\[2\]\.endTime: must be > startTime"):
        load_timeline(bad)


def test_programmatic_timelines_are_checked_too() -> None:
    one = (WeightedPrompt(text=CAT),)
    with pytest.raises(TimelineError, match=r"segments\[1\]\.start: overlaps segments\[0\]"):
        Timeline((Segment(0, 2, one), Segment(1, 3, one)))
    with pytest.raises(TimelineError, match=r"segments\[0\]\.end: only the last segment may be open-ended"):
        Timeline((Segment(0, math.inf, one), Segment(1, 3, one)))
    with pytest.raises(TimelineError, match=r"segments\[0\]\.prompts: must not be empty"):
        Timeline((Segment(0, 2, ()),))
    with pytest.raises(TimelineError, match="segments: must contain at least one segment"):
        Timeline(())
    with pytest.raises(TimelineError, match=r"prompts\[1\]\.text: prompt text is empty"):
        Timeline.constant([CAT, "  "])


# ---------------------------------------------------------------------------------------------------------
# Time queries


def gappy() -> Timeline:
    one, two, three = (WeightedPrompt(text=t) for t in (CAT, TIGER, LION))
    return Timeline((Segment(1.0, 2.0, (one,)), Segment(3.0, 4.0, (two,)), Segment(4.0, 6.0, (three,))))


def test_segment_at() -> None:
    tl = gappy()
    cases = {0.0: 0, 0.99: 0, 1.0: 0, 2.5: 0, 2.999: 0, 3.0: 1, 3.9999999: 2, 4.0: 2, 5.0: 2, 100.0: 2}
    # Before the first start: the first segment; in a gap: the previous one; 4 − 1e-7 is on the boundary.
    assert {t: tl.index_at(t) for t in cases} == cases
    assert tl.segment_at(3.5).prompts[0].text == TIGER
    assert tl.duration == 6.0


def test_start_frames_at_a_constant_rate() -> None:
    tl = parse_timeline(v20())  # starts 0, 2.5, 5.25
    times = [i / 16 for i in range(120)]
    assert tl.start_frames(times) == [0, 40, 84]  # 2.5 s is frame 40 exactly; 5.25 s is frame 84
    segs = tl.frame_segments(times)
    assert segs[:40] == [0] * 40 and segs[40:84] == [1] * 44 and segs[84:] == [2] * 36
    # A short video never reaches the later segments.
    assert tl.start_frames(times[:49]) == [0, 40, 49]
    assert set(tl.frame_segments(times[:49])) == {0, 1}
    # Timestamps as a tensor, as VideoReader returns them.
    assert tl.start_frames(torch.tensor(times, dtype=torch.float64)) == [0, 40, 84]


def test_start_frames_with_variable_frame_rate() -> None:
    prompts = (WeightedPrompt(text=CAT),)
    starts = [0.0, 0.3, 0.4, 1.0, 1.31, 1.33, 5.0]
    tl = Timeline(tuple(Segment(s, e, prompts) for s, e in zip(starts, [*starts[1:], 6.0])))
    times = [0.0, 0.1, 0.35, 0.4, 0.9999999999, 1.2, 1.4, 2.0]
    # First frame at or after each start; 0.9999999999 counts as 1.0 (decoder rounding); 1.31 and 1.33 both
    # begin before frame 6 (1.4 s), so the later one wins it and the earlier one gets no frame at all.
    assert tl.start_frames(times) == [0, 2, 3, 4, 6, 6, 8]
    assert tl.frame_segments(times) == [0, 0, 1, 2, 3, 3, 5, 5]


# ---------------------------------------------------------------------------------------------------------
# Export


def test_export_parse_round_trip(tmp_path: Path) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    for tl in [load_timeline(p) for p in EXAMPLES] + [parse_timeline(v21()), gappy()]:
        data = tl.to_scope(exported_at=when)
        assert data["version"] == "2.1" and data["exportedAt"] == "2026-01-02T03:04:05.678Z"
        assert parse_timeline(json.loads(json.dumps(data))) == tl
    # A live session's prompt history with every setting, saved and replayed.
    history = Timeline(
        (
            Segment(0.0, 3.2, (WeightedPrompt(text=CAT, weight=2.0), WeightedPrompt(text=LION, weight=1.0))),
            Segment(3.2, 7.9, (WeightedPrompt(text=TIGER),), 8, "linear"),
        ),
        TimelineSettings(
            pipeline_id="streamdiffusionv2",
            input_mode="video",
            height=512,
            width=512,
            seed=7,
            denoising_steps=(1000, 750, 500),
            noise_scale=0.65,
            noise_controller=True,
            manage_cache=True,
            quantization="fp8_e4m3fn",
            kv_cache_attention_bias=0.3,
            loras=(LoraSetting("a.safetensors", 0.5, "permanent_merge"), LoraSetting("b.safetensors", 1.0)),
            lora_merge_strategy="permanent_merge",
        ),
    )
    path = history.save(tmp_path / "history.json")
    assert load_timeline(path) == history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]
    assert json.loads(path.read_text())["settings"]["resolution"] == {"height": 512, "width": 512}


def test_open_ended_timelines_cannot_be_exported() -> None:
    tl = Timeline.constant([CAT])
    assert tl.segments[0].end == math.inf and tl.index_at(42.0) == 0
    with pytest.raises(TimelineError, match=r"segments\[0\]\.end: is open-ended"):
        tl.to_scope()
