"""A stream's settings, validated once at the boundary and immutable inside.

One pydantic model serves the engine, the CLI, the server and timelines, so every interface rejects
the same bad values with the same messages. `SettingsUpdate` is the partial form used for live
changes, derived from `StreamSettings` field by field: a rejected update leaves the session untouched.

This module is the one home of the settings' vocabulary (the Literals below) and of their rules, those
across fields and those between the settings and what a stream has attached (`*_problem` functions):
other modules import them rather than restate them.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    model_validator,
)

from wanstream.models.kv_cache import Eviction  # the cache's own policies; named here for every interface

Mode = Literal["video", "text"]
Batching = Literal["stream", "none"]
Codec = Literal["wan", "taehv"]
CacheContext = Literal["last_step", "clean"]
PromptSwitch = Literal["cut", "refresh"]
LoraMode = Literal["merged", "runtime"]

# The authors' defaults (StreamDiffusionV2 after their issue #20): 2 steps, noise scale 0.8.
DEFAULT_STEPS = (700, 500)
# Text mode starts from pure noise, so the first step must be at t = 1000 (Scope's text default).
DEFAULT_TEXT_STEPS = (1000, 750)
MAX_STEPS = 8
MAX_LORAS = 16
MAX_LORA_SCALE = 10.0  # Scope's range: -10..10
# Scope's names for the two LoRA modes (timelines and workflows exported by Scope use them).
ScopeLoraModeName = Literal["permanent_merge", "runtime_peft"]
SCOPE_LORA_MODES: dict[ScopeLoraModeName, LoraMode] = {"permanent_merge": "merged", "runtime_peft": "runtime"}
LoraModeName = Literal[LoraMode, ScopeLoraModeName]  # a LoRA mode by either name (as a file gives it)


def _lora_mode(value: Any) -> Any:
    return SCOPE_LORA_MODES.get(value, value) if isinstance(value, str) else value


def _multiple_of_16(v: int) -> int:
    if v % 16:
        lower, upper = v // 16 * 16, (v // 16 + 1) * 16
        raise ValueError(f"{v} is not a multiple of 16 (VAE ×8 and patch ×2); use {lower} or {upper}")
    return v


def _descending_steps(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v:
        raise ValueError("the step list is empty; give 1 to 8 descending timesteps, e.g. 700,500")
    if len(v) > MAX_STEPS:
        raise ValueError(f"{len(v)} steps; at most {MAX_STEPS}")
    if any(not 0 < t <= 1000 for t in v):
        raise ValueError(f"timesteps must be in (0, 1000], got {list(v)}")
    if any(a <= b for a, b in pairwise(v)):
        raise ValueError(f"timesteps must be strictly descending, got {list(v)}")
    return v


def _distinct_loras(v: tuple[LoraSpec, ...]) -> tuple[LoraSpec, ...]:
    seen = [lo.path for lo in v]
    twice = sorted({p for p in seen if seen.count(p) > 1})
    if twice:
        raise ValueError(f"LoRA listed twice: {', '.join(twice)} (give each file once, with one scale)")
    return v


# Single-field rules ride on the field's type (not on model validators), so that `SettingsUpdate`, built
# from the same types, applies them too.
PixelSize = Annotated[int, AfterValidator(_multiple_of_16)]
Steps = Annotated[tuple[int, ...], AfterValidator(_descending_steps)]
ScopeLoraMode = Annotated[LoraMode, BeforeValidator(_lora_mode)]  # also accepts Scope's names


class LoraSpec(BaseModel):
    """One LoRA in force: a file, its strength and how it is applied (docs/lora.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        description="The LoRA file: a path, or a name in the LoRA folder (WANSTREAM_LORA_DIR). The server "
        "accepts only names inside its LoRA folder (GET /api/v1/loras).",
    )
    scale: float = Field(
        1.0,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        allow_inf_nan=False,
        description="Strength, -10..10 (0: no effect). The weight change is scale · alpha/rank · B·A.",
    )
    mode: ScopeLoraMode | None = Field(
        None,
        description="'merged': folded into the weights (no per-frame cost; a scale change re-merges); "
        "'runtime': adapters in the forward (scale changes are instant; some per-frame cost). "
        "None: the settings' lora_mode.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data  # "style.safetensors" = scale 1


class StreamSettings(BaseModel):
    """Everything that shapes a stream. Fields that need a rebuild are listed in `REBUILD_FIELDS`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    height: PixelSize = Field(480, ge=16, le=4096, description="Output height in pixels (multiple of 16).")
    width: PixelSize = Field(832, ge=16, le=4096, description="Output width in pixels (multiple of 16).")
    mode: Mode = Field(
        "video", description="'video': restyle input frames; 'text': generate from prompts alone."
    )
    steps: Steps | None = Field(
        None,
        description="Descending denoising timesteps (1-8 entries in (0, 1000]); default 700,500 (video) "
        "or 1000,750 (text).",
    )
    noise_scale: float = Field(0.8, ge=0.0, le=1.0, description="How much of the input is replaced by noise.")
    noise_controller: bool = Field(
        True, description="Lower the noise when the input moves fast (motion-aware)."
    )
    seed: int = Field(42, ge=0, lt=2**63, description="Seed: same seed + inputs + prompts = same video.")
    batching: Batching = Field(
        "stream",
        description="'stream': steps as batch lanes (fastest, N-1 chunks of lag); 'none': lowest latency.",
    )
    encoder: Codec = Field("wan", description="Encoder for input frames: Wan VAE or TAEHV (fast).")
    decoder: Codec = Field("wan", description="Decoder for output frames: Wan VAE or TAEHV (fast).")
    kv_cache_frames: int = Field(6, ge=4, le=64, description="Latent frames the attention cache holds.")
    sink_frames: int = Field(3, ge=0, le=16, description="Cache frames kept as attention sinks.")
    sink_threshold: float = Field(
        0.2, ge=-1.0, le=1.0, description="Adaptive sink: refresh a sink below this similarity (-1: off)."
    )
    eviction: Eviction = Field("sdv2", description="'sdv2': the authors' ring buffer; 'fifo': Scope's cache.")
    cache_context: CacheContext = Field(
        "last_step", description="'last_step': cache keeps the last step's keys; 'clean': an extra t=0 pass."
    )
    rope_reset_frame: int | None = Field(
        50,
        ge=8,
        le=1000,
        description="Reset RoPE positions when the latent frame index reaches this (None: never).",
    )
    prompt_switch: PromptSwitch = Field(
        "refresh",
        description="A prompt change without transition: 'refresh' keeps the cache, 'cut' resets it.",
    )
    loras: Annotated[tuple[LoraSpec, ...], AfterValidator(_distinct_loras)] = Field(
        (),
        max_length=MAX_LORAS,
        description="LoRAs applied to the DiT, each with its scale (and mode); [] for none.",
    )
    lora_mode: ScopeLoraMode = Field(
        "merged",
        description="How LoRAs without their own mode apply: 'merged' (zero per-frame cost) or 'runtime' "
        "(instant scale changes, some per-frame cost).",
    )
    lora_switch: PromptSwitch = Field(
        "refresh",
        description="A LoRA change: 'refresh' keeps the cache (the new style settles in over a few chunks), "
        "'cut' restarts the stream (Scope's manage_cache).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> StreamSettings:
        if self.sink_frames >= self.kv_cache_frames:
            raise ValueError(
                f"sink_frames ({self.sink_frames}) must be below kv_cache_frames ({self.kv_cache_frames})"
            )
        if problem := clean_cache_problem(self.batching, self.cache_context):
            raise ValueError(problem)
        if self.rope_reset_frame is not None and self.rope_reset_frame <= self.kv_cache_frames:
            raise ValueError(
                f"rope_reset_frame ({self.rope_reset_frame}) must exceed kv_cache_frames ({self.kv_cache_frames}): "
                "positions restart at the last cache frame"
            )
        return self

    @property
    def denoising_steps(self) -> tuple[int, ...]:
        if self.steps is not None:
            return self.steps
        return DEFAULT_TEXT_STEPS if self.mode == "text" else DEFAULT_STEPS

    @property
    def frame_tokens(self) -> int:
        """DiT tokens per latent frame: (H/16)·(W/16)."""
        return (self.height // 16) * (self.width // 16)

    @property
    def lora_summary(self) -> tuple[tuple[str, float, LoraMode], ...]:
        """(path, scale, mode) of each LoRA in force, modes resolved (for event logs and stats)."""
        return tuple((lo.path, lo.scale, lo.mode or self.lora_mode) for lo in self.loras)

    def updated(self, update: SettingsUpdate) -> StreamSettings:
        """A new validated settings object with the update applied (raises, leaving self intact)."""
        changes = update.model_dump(exclude_unset=True)
        return StreamSettings.model_validate({**self.model_dump(), **changes})


# Changing any of these rebuilds the stream's state (a reset); the others apply from the next chunk.
REBUILD_FIELDS = frozenset(
    {
        "height",
        "width",
        "mode",
        "batching",
        "encoder",
        "decoder",
        "kv_cache_frames",
        "sink_frames",
        "sink_threshold",
        "eviction",
        "cache_context",
    }
)
# Changing these changes the DiT's weights from the next chunk (a restart too when lora_switch is 'cut').
LORA_FIELDS = frozenset({"loras", "lora_mode"})


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """`model`'s fields, each optional and unset unless given, with the same types, limits, validators and
    descriptions. (Rules across fields apply when an update is merged: `StreamSettings.updated`.)"""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (tp | None, Field(None, description=info.description))
    return create_model(f"Partial{model.__name__}", __config__=ConfigDict(extra="forbid"), **fields)


class SettingsUpdate(_partial(StreamSettings)):  # type: ignore[misc]  # a base made at import time
    """A live change: only the fields given are changed (each field as in `StreamSettings`)."""


# ---------------------------------------------------------------------------------------------------------
# Rules between fields, or between the settings and what a stream has attached. Each is written once, here;
# an interface raises its own error with the reason returned and may add how its user fixes it.


def clean_cache_problem(batching: Batching, cache_context: CacheContext) -> str | None:
    """The clean cache pass runs once per chunk after its last step; stream batch has no such moment."""
    if batching == "stream" and cache_context == "clean":
        return "cache_context 'clean' (an extra t=0 pass per chunk) needs batching 'none'"
    return None


# Per-chunk conditioning (VACE) joins each chunk's hints to that chunk while it is denoised; stream batch
# denoises several chunks at once in lanes, so conditioned streams run with this batching.
CONDITIONED_BATCHING: Batching = "none"


def conditioning_problem(batching: Batching) -> str | None:
    """Why a stream with this batching cannot take per-chunk conditioning (VACE), or None."""
    if batching != CONDITIONED_BATCHING:
        return f"VACE runs chunk by chunk: it needs batching '{CONDITIONED_BATCHING}', not '{batching}'"
    return None


# A multi-GPU ring (parallel/) keeps several chunks in flight across its ranks, so it has no moment at which
# one chunk alone is denoised: per-chunk conditioning runs on one GPU.
RING_CONDITIONING_PROBLEM = (
    "per-chunk conditioning (VACE) runs chunk by chunk on one GPU, not on a multi-GPU ring"
)
# Every rank holds its own blocks of the DiT: a LoRA would have to be merged or attached on each of them.
RING_LORA_PROBLEM = "LoRAs are not supported on a multi-GPU ring yet (they change every rank's blocks)"


def text_mode_problem(mode: Mode, has_prompts: bool) -> str | None:
    """Text mode generates from the prompts alone: it cannot start or continue without them."""
    if mode == "text" and not has_prompts:
        return "text mode needs prompts"
    return None


def text_steps_problem(settings: StreamSettings) -> str | None:
    """A warning, not an error: text mode starts from pure noise (t = 1000), so a lower first step treats
    noise as if part of it were signal."""
    first = settings.denoising_steps[0]
    if settings.mode == "text" and first < 1000:
        return (
            f"text mode starts from pure noise: a first step of {first} (below 1000) gives washed-out video"
        )
    return None
