"""`SettingsUpdate` is derived from `StreamSettings`: every field, with the same limits and messages."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from pydantic import ValidationError

from wanstream.engine.settings import (
    DEFAULT_TEXT_STEPS,
    SCOPE_LORA_MODES,
    LoraMode,
    LoraModeName,
    LoraSpec,
    ScopeLoraModeName,
    SettingsUpdate,
    StreamSettings,
    clean_cache_problem,
    conditioning_problem,
    text_mode_problem,
    text_steps_problem,
)

# One value per field that StreamSettings refuses on that field alone (fields without a limit: a wrong type).
BAD_VALUE: dict[str, Any] = {
    "height": 50,
    "width": 5000,
    "mode": "sketch",
    "steps": (500, 700),
    "noise_scale": 1.5,
    "noise_controller": "sometimes",
    "seed": -1,
    "batching": "sometimes",
    "encoder": "jpeg",
    "decoder": "jpeg",
    "kv_cache_frames": 2,
    "sink_frames": 17,
    "sink_threshold": 1.5,
    "eviction": "lru",
    "cache_context": "dirty",
    "rope_reset_frame": 4,
    "prompt_switch": "fade",
    "loras": ("a.safetensors", "a.safetensors"),
    "lora_mode": "baked",
    "lora_switch": "fade",
}


def test_the_update_has_every_setting_each_optional_and_described_alike() -> None:
    assert list(SettingsUpdate.model_fields) == list(StreamSettings.model_fields)
    assert set(BAD_VALUE) == set(StreamSettings.model_fields)  # a new setting needs a row above
    for name, info in SettingsUpdate.model_fields.items():
        assert info.default is None and not info.is_required(), name
        assert info.description == StreamSettings.model_fields[name].description, name
    assert SettingsUpdate(seed=3).model_fields_set == {"seed"}


def _accepted(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """A property's JSON-schema alternatives other than null (the field's title, description, default aside)."""
    core = {k: v for k, v in prop.items() if k not in ("title", "description", "default")}
    return [option for option in core.get("anyOf", [core]) if option != {"type": "null"}]


def test_the_update_schema_documents_each_setting_as_the_settings_schema_does() -> None:
    whole = StreamSettings.model_json_schema()
    update = SettingsUpdate.model_json_schema()
    for name, prop in whole["properties"].items():
        assert _accepted(update["properties"][name]) == _accepted(prop), name
    assert update["$defs"] == whole["$defs"]  # LoraSpec


@pytest.mark.parametrize(("field", "bad"), BAD_VALUE.items())
def test_the_update_refuses_what_the_settings_refuse_with_the_same_message(field: str, bad: Any) -> None:
    with pytest.raises(ValidationError) as whole:
        StreamSettings(**{field: bad})
    with pytest.raises(ValidationError) as update:
        SettingsUpdate(**{field: bad})
    assert [e["msg"] for e in update.value.errors()] == [e["msg"] for e in whole.value.errors()]
    assert all(e["loc"][0] == field for e in update.value.errors())


def test_the_update_takes_scope_names_and_null_for_the_nullable_settings() -> None:
    update = SettingsUpdate.model_validate_json(
        '{"lora_mode": "runtime_peft", "loras": [{"path": "a", "mode": "permanent_merge"}], '
        '"steps": null, "rope_reset_frame": null}',
        strict=True,
    )
    settings = StreamSettings(steps=(600,)).updated(update)
    assert settings.lora_mode == "runtime" and settings.loras[0].mode == "merged"
    assert settings.steps is None and settings.rope_reset_frame is None
    with pytest.raises(ValidationError, match="extra"):
        SettingsUpdate(bogus=1)


def test_rules_across_fields_apply_when_an_update_is_merged() -> None:
    update = SettingsUpdate(sink_frames=8)  # valid alone; too many sinks for the default cache
    with pytest.raises(ValidationError, match=r"sink_frames \(8\) must be below kv_cache_frames \(6\)"):
        StreamSettings().updated(update)
    assert StreamSettings().updated(SettingsUpdate(sink_frames=8, kv_cache_frames=12)).sink_frames == 8


def test_each_rule_says_why_and_passes_what_it_allows() -> None:
    assert clean_cache_problem("stream", "clean") == (
        "cache_context 'clean' (an extra t=0 pass per chunk) needs batching 'none'"
    )
    assert clean_cache_problem("none", "clean") is None and clean_cache_problem("stream", "last_step") is None
    assert (
        conditioning_problem("stream") == "VACE runs chunk by chunk: it needs batching 'none', not 'stream'"
    )
    assert conditioning_problem("none") is None
    assert text_mode_problem("text", has_prompts=False) == "text mode needs prompts"
    assert text_mode_problem("text", has_prompts=True) is None and text_mode_problem("video", False) is None
    text = StreamSettings(mode="text", steps=(700, 500))
    assert text_steps_problem(text) == (
        "text mode starts from pure noise: a first step of 700 (below 1000) gives washed-out video"
    )
    assert text_steps_problem(StreamSettings(mode="text")) is None  # the text default starts at 1000
    assert StreamSettings(mode="text").denoising_steps == DEFAULT_TEXT_STEPS
    assert text_steps_problem(StreamSettings(steps=(700, 500))) is None  # video mode starts from the input


def test_scope_lora_mode_names_map_onto_the_engines() -> None:
    assert set(SCOPE_LORA_MODES) == set(get_args(ScopeLoraModeName))
    assert sorted(SCOPE_LORA_MODES.values()) == sorted(get_args(LoraMode))
    assert set(get_args(LoraModeName)) == {*get_args(LoraMode), *get_args(ScopeLoraModeName)}
    for scope, ours in SCOPE_LORA_MODES.items():
        assert LoraSpec(path="a.safetensors", mode=scope).mode == ours
