"""What `generate` is asked to do: `GenerateRequest`, and `GenerateError` for a request that cannot be run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from wanstream.engine.prompts import WeightedPrompt
from wanstream.engine.settings import Batching, Codec, LoraMode, LoraSpec, Mode
from wanstream.timeline import Timeline

# The job's choice of batching: the engine's, or "auto" (stream batch or none, from the number of steps).
JobBatching = Literal["auto", Batching]


class GenerateError(ValueError):
    """Bad input (a request field, the timeline, the input video or the output path); nothing was written."""


class GenerateRequest(BaseModel):
    """What to generate. `None` means "not given": the timeline's setting, else the default, applies."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    input: Path | None = Field(None, description="Input video; None: the built-in clip (video mode).")
    output: Path = Field(Path("output.mp4"), description="The MP4 to write (atomically).")
    timeline: Timeline | Path | None = Field(
        None, description="A Scope timeline/workflow file, or a Timeline."
    )
    prompts: tuple[WeightedPrompt | str, ...] | None = Field(
        None, description="A fixed prompt blend instead of a timeline."
    )
    mode: Mode | None = Field(None, description="'video' (restyle input) or 'text' (prompts alone).")
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: tuple[int, ...] | None = Field(
        None, description="Descending denoising timesteps, e.g. (700, 500)."
    )
    noise_scale: float | None = Field(None, ge=0.0, le=1.0)
    noise_controller: bool | None = None
    vae: Codec | None = Field(
        None,
        description="Encoder and decoder: the Wan VAE, or TAEHV (fast). None: the Wan VAE, except with the "
        "demo model (TAEHV: the tiny Wan VAE's 3-D convolutions are slow at full size on a CPU).",
    )
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    batching: JobBatching = Field("auto", description="'auto': stream batch, or none for a single step.")
    frames: int | None = Field(
        None, ge=1, le=10_000_000, description="Text mode and built-in clip: length; input video: at most."
    )
    fps: float | None = Field(
        None, gt=0, le=240, description="Output rate; an input video is resampled to it by timestamps."
    )
    stats_json: Path | None = Field(None, description="Also write the run's statistics here (JSON).")
    loras: tuple[LoraSpec, ...] | None = Field(
        None, description="LoRAs to apply (path, scale, mode; docs/lora.md); None: the timeline's, if any."
    )
    lora_mode: LoraMode | None = Field(None, description="Mode of LoRAs that give none (default 'merged').")
    # VACE (docs/vace.md): a control video (+ masks), reference images, first/last frame.
    control_video: Path | None = Field(
        None,
        description="VACE control video; without an input video it drives text mode (as Scope routes it).",
    )
    mask_video: Path | None = Field(
        None, description="Masks of the control video (white = generate, black = keep), same size and length."
    )
    ref_images: tuple[Path, ...] | None = Field(None, description="VACE reference images (subject / style).")
    ref_once: bool = Field(False, description="References on the first chunk only (Scope), not every chunk.")
    first_frame: Path | None = Field(None, description="VACE extension: the video starts from this image.")
    last_frame: Path | None = Field(None, description="VACE extension: the video ends on this image.")
    vace_scale: float | None = Field(None, ge=0.0, le=2.0, description="vace_context_scale (default 1).")
    vace_corrected: bool = Field(
        False, description="VACE with the corrected numerics instead of Scope's quirks (docs/vace.md)."
    )
