"""Request and response bodies. Live updates reuse the engine's own pydantic models, so the server, the
CLI and timelines accept and reject exactly the same values with the same messages."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from wanstream.engine.prompts import Transition, WeightedPrompt
from wanstream.engine.settings import PromptSwitch, SettingsUpdate
from wanstream.server.io.specs import MAX_SINKS, NdiInput, SinkSpec
from wanstream.server.limits import MAX_PROMPT_CHARS, MAX_PROMPTS_CHARS
from wanstream.server.tempo import Quantize
from wanstream.server.vace import MAX_REFERENCES, VaceOptions

MAX_PROMPTS = 8
MAX_SDP_CHARS = 64 * 1024


def _text_to_prompt(value: Any) -> Any:
    return {"text": value} if isinstance(value, str) else value


def _fits(prompt: WeightedPrompt) -> WeightedPrompt:
    if len(prompt.text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the prompt is {len(prompt.text)} characters; at most {MAX_PROMPT_CHARS} are accepted (the model "
            "reads 512 tokens of it)"
        )
    return prompt


def _all_fit(prompts: list[WeightedPrompt]) -> list[WeightedPrompt]:
    total = sum(len(p.text) for p in prompts)
    if total > MAX_PROMPTS_CHARS:
        raise ValueError(
            f"the prompts are {total} characters together; at most {MAX_PROMPTS_CHARS} are accepted "
            "(each stream keeps them in its status and event log)"
        )
    return prompts


# A prompt is "text" or {"text": ..., "weight": ...}; both are validated by the engine's WeightedPrompt.
Prompt = Annotated[WeightedPrompt, BeforeValidator(_text_to_prompt), AfterValidator(_fits)]
Prompts = Annotated[list[Prompt], AfterValidator(_all_fit)]


def strict_json(tp: Any) -> BeforeValidator:
    """Validate a field as strict JSON: `true` is not the number 1, "5" is not 5, 2.0 is not an int.
    (FastAPI hands bodies over as Python objects, which pydantic would coerce; they are validated from
    their JSON text instead. Values built in Python pass through to the usual validation.)"""
    adapter: TypeAdapter[Any] = TypeAdapter(tp)

    def validate(value: Any) -> Any:
        if not isinstance(value, dict | list | str | int | float | bool):
            return value
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return value
        return adapter.validate_json(text, strict=True)

    return BeforeValidator(validate)


def parse_control(raw: str | bytes) -> Control:
    """A live update from its JSON text, strictly (raises ValidationError)."""
    return Control.model_validate_json(raw, strict=True)


class Control(SettingsUpdate):
    """One live update (data channel `parameters`, `POST /api/v1/sessions/{id}/control`, WebSocket).

    Every `SettingsUpdate` field may be given at the top level (seed, steps, noise_scale,
    noise_controller, resolution, encoder/decoder, ...), plus prompts, a transition, reset and pause.
    The whole message is validated before anything is applied: a rejected one changes nothing.
    """

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(None, description="Echoed in the ack or error, to match replies.")
    prompts: Prompts | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPTS,
        description="The new prompts: strings or {text, weight} (weights are normalised).",
    )
    transition: Transition | None = Field(
        None, description="Blend into the new prompts over `steps` chunks (needs `prompts`)."
    )
    switch: PromptSwitch | None = Field(
        None,
        description="Without a transition: 'cut' restarts the stream (no old-prompt frame is shown after "
        "it), 'refresh' keeps the cache. Default: the session's prompt_switch setting.",
    )
    reset: bool = Field(
        False, description="Restart the stream (hard cut): caches cleared, stale frames flushed."
    )
    paused: bool | None = Field(None, description="Pause or resume processing.")
    quantize: Quantize | None = Field(
        None,
        description="Land this update on the server's tempo: 'beat' (the chunk nearest the next beat), "
        "'bar' (nearest the next downbeat) or 'off' (at once); acknowledged when applied. Default: the "
        "tempo's `quantize` for prompt changes and resets, at once for everything else.",
    )
    # VACE (streams started with "vace"): Scope's parameter names.
    vace_context_scale: float | None = Field(
        None, ge=0.0, le=2.0, description="VACE strength from the next chunk (0-2; 0 still computes hints)."
    )
    vace_ref_images: list[str] | None = Field(
        None,
        max_length=MAX_REFERENCES,
        description="Reference images by media-folder name (replacing the current ones; [] clears them).",
    )
    first_frame_image: str | None = Field(
        None, description="VACE extension: the next chunk starts from this media-folder image."
    )
    last_frame_image: str | None = Field(
        None, description="VACE extension: the next chunk ends on this media-folder image."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Control:
        if self.transition is not None and self.prompts is None:
            raise ValueError("a transition needs prompts to transition to")
        if self.switch is not None and self.prompts is None:
            raise ValueError("'switch' applies to a prompt change: give 'prompts' too")
        if self.first_frame_image is not None and self.last_frame_image is not None:
            raise ValueError(
                "first_frame_image and last_frame_image on one chunk need 8 frames; StreamDiffusionV2's hold 4: "
                "send them in separate updates"
            )
        return self

    def vace_fields(self) -> set[str]:
        return self.model_fields_set & VACE_CONTROL_FIELDS

    def settings_update(self) -> SettingsUpdate | None:
        fields = self.model_fields_set & set(SettingsUpdate.model_fields)
        if not fields:
            return None
        return SettingsUpdate.model_validate({k: getattr(self, k) for k in fields})


VACE_CONTROL_FIELDS = frozenset(
    {"vace_context_scale", "vace_ref_images", "first_frame_image", "last_frame_image"}
)


class ControlAck(BaseModel):
    type: Literal["ack"] = "ack"
    id: str | int | None = None
    applied: list[str] = Field(description="The keys that were applied.")
    restarted: bool = Field(description="The stream restarted (caches cleared) with this update.")
    flushed: bool = Field(
        description="A cut (reset, or a prompt change that restarted the stream): frames made before it "
        "were dropped and none of them will be sent."
    )
    epoch: int = Field(description="Increments on every restart; frames of older epochs are never sent.")
    next_chunk: int = Field(description="Index of the first chunk made under this update.")


class ErrorBody(BaseModel):
    type: Literal["error"] = "error"
    id: str | int | None = None
    error: str
    details: list[dict[str, Any]] = Field(default_factory=list)


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
    ]


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Sessions


class StreamRequest(BaseModel):
    """What a new stream starts with (server defaults for everything not given)."""

    model_config = ConfigDict(extra="forbid")

    settings: Annotated[SettingsUpdate | None, strict_json(SettingsUpdate | None)] = Field(
        None, description="Overrides of the server's default settings."
    )
    prompts: Annotated[Prompts | None, strict_json(Prompts | None)] = Field(
        None, min_length=1, max_length=MAX_PROMPTS, description="Initial prompts (default: the server's)."
    )
    vace: Annotated[VaceOptions | None, strict_json(VaceOptions | None)] = Field(
        None,
        description="VACE conditioning (control from the input video, reference images); see docs/vace.md.",
    )
    sinks: Annotated[list[SinkSpec] | None, strict_json(list[SinkSpec] | None)] = Field(
        None,
        max_length=MAX_SINKS,
        description="Server-side outputs besides the browser (MPEG-TS, NDI, virtual camera, Spout, Syphon); "
        "the server's --sink defaults when not given. See docs/live-rig.md.",
    )


class OfferRequest(StreamRequest):
    sdp: str = Field(..., min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"] = "offer"


class OfferAnswer(BaseModel):
    sdp: str
    type: Literal["answer"] = "answer"
    session_id: str


class IceCandidate(BaseModel):
    candidate: str = Field(
        ..., max_length=1024, description="'candidate:...' line; empty = end of candidates"
    )
    sdpMid: str | None = None
    sdpMLineIndex: int | None = Field(None, ge=0, le=16)


class IcePatch(BaseModel):
    candidates: list[IceCandidate] = Field(..., max_length=64)


class HeadlessRequest(StreamRequest):
    source: Literal["file", "text", "ndi"] = Field(
        ...,
        description="'file': restyle a video from the media folder; 'text': generate from prompts; "
        "'ndi': restyle an NDI source.",
    )
    file: str | None = Field(None, description="Name of the video inside the media folder (source 'file').")
    loop: bool = Field(True, description="Restart the file at its end.")
    ndi: Annotated[NdiInput | None, strict_json(NdiInput | None)] = Field(
        None, description="The NDI source (source 'ndi'): its name, or its address HOST:PORT."
    )

    @model_validator(mode="after")
    def _file_given(self) -> HeadlessRequest:
        if self.source == "file" and not self.file:
            raise ValueError("source 'file' needs 'file': the name of a video in the media folder")
        if self.source != "file" and self.file:
            raise ValueError(f"source {self.source!r} takes no 'file'")
        if self.source == "ndi" and self.ndi is None:
            raise ValueError('source \'ndi\' needs \'ndi\': {"name": ...} or {"address": "HOST:PORT"}')
        if self.source != "ndi" and self.ndi is not None:
            raise ValueError(f"source {self.source!r} takes no 'ndi'")
        return self


class SessionCreated(BaseModel):
    session_id: str


class RecordingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_input: bool = Field(False, description="Also record the input stream (a second MP4).")


class RecordingInfo(BaseModel):
    session_id: str
    state: Literal["recording", "stopped"]
    output_frames: int
    input_frames: int | None = None
    dropped_frames: int
    output_url: str
    input_url: str | None = None


# ----------------------------------------------------------------------------------------------------
# Model


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    demo: bool | None = Field(
        None,
        description="true: the tiny random-weight demo model; false: the real weights from the server's "
        "--models-dir (a client never names server paths). Default: what the server started with.",
    )
    precision: Literal["bf16", "fp8"] | None = Field(
        None,
        description="The DiT's weights for this load: bf16, or fp8 (half their memory; float8 GEMMs on a GPU of "
        "compute capability >= 8.9). The demo model ignores it. Default: the server's --precision, or the "
        "last load's.",
    )


class ModelStatus(BaseModel):
    state: Literal["not_loaded", "loading", "loaded", "error"]
    stage: str = ""
    progress: float | None = Field(
        0.0, ge=0.0, le=1.0, description="0 before, 1 when loaded, null while loading (see `stage`)."
    )
    label: str = ""
    device: str = ""
    error: str | None = None
    elapsed_s: float | None = None
    demo: bool = Field(
        False, description="The tiny random-weight demo model (or, before loading, the default)."
    )
    random_weights: bool = Field(
        False, description="Full-size networks with RANDOM weights (serve --random-weights): output is noise."
    )
    text_encoder: str = Field(
        "", description="Where the text encoder lives: gpu, fp8, host (docs/memory.md)."
    )
    precision: str = Field(
        "",
        description="The DiT's weights: bf16, or fp8 (float8; float8 GEMMs where the GPU has them) — of the "
        "loaded model, or, while none is loaded, what the next load uses.",
    )
    codecs: list[str] = Field(
        default_factory=list, description="Autoencoders loaded ('wan', 'taehv'): the encoder/decoder choices."
    )
    download_command: str | None = Field(
        None, description="When the load failed for missing weights: the command that fetches them."
    )
    vace: bool = Field(False, description='The VACE module is loaded: streams may start with "vace".')
