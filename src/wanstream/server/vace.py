"""VACE on the server: start options, the input track routed as control, reference images, live changes.

As Scope does (`vace_enabled`, `vace_use_input_video`): a stream started with VACE on and an input video
(a WebRTC track, or a headless session's file from the media folder) routes that input to VACE as its
control frames by default, and the engine runs in text mode — the frames steer generation from noise
instead of being restyled. With `use_input_video: false` the input is restyled as usual and VACE works from
reference images (and first/last frames) alone. Reference and first/last-frame images are named by their
path in the media folder (`PUT /api/v1/media/{name}` uploads them) and read before the stream starts or the
update applies, so a bad name or file is refused with nothing changed. VACE runs chunk by chunk: the stream's
batching must be "none" (it is chosen when not given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from wanstream.engine.settings import CONDITIONED_BATCHING, conditioning_problem
from wanstream.engine.vace import VaceChunk, VaceConditioner
from wanstream.media.images import ImageReadError, read_image
from wanstream.server.limits import LimitExceeded, check_image_header
from wanstream.server.security import SecurityError, check_image_name, resolve_media_path

if TYPE_CHECKING:
    from wanstream.engine.components import Components
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings

MAX_REFERENCES = 4  # as Scope's UI


class VaceOptions(BaseModel):
    """VACE for a new stream (`"vace": {...}` in the offer or the headless request)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Attach VACE to the stream (Scope's vace_enabled).")
    context_scale: float = Field(
        1.0, ge=0.0, le=2.0, description="vace_context_scale: how strongly VACE steers each chunk (0-2)."
    )
    use_input_video: bool = Field(
        True,
        description="Route the input video (WebRTC track or headless file) to VACE as control frames; the "
        "engine then runs in text mode (Scope's vace_use_input_video). False: the input is restyled.",
    )
    ref_images: list[str] | None = Field(
        None, max_length=MAX_REFERENCES, description="Reference images: names in the media folder."
    )
    persist_refs: bool = Field(
        False,
        description="References condition every chunk (encoded once); default: the next chunk only, as Scope.",
    )


class VaceRefused(ValueError):
    """A VACE request the server cannot honour; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class VaceSetup:
    """How a stream uses VACE, decided before it starts."""

    scale: float
    route_input: bool  # input frames → control frames (text mode)
    references: list[torch.Tensor] = field(default_factory=list)  # uint8 [H, W, 3]
    persist_refs: bool = False
    media_dir: Path | None = None

    def attach(self, session: StreamSession) -> VaceConditioner:
        """Attach the conditioner to a new engine session (on the worker thread)."""
        cond = VaceConditioner(session, scale=self.scale)
        session.attach(cond)
        if self.references:
            cond.set_reference_images(self.references, persist=self.persist_refs)
        return cond

    def read_image(self, name: str, what: str) -> torch.Tensor:
        return read_media_image(self.media_dir, name, what)

    def describe(self, cond: VaceConditioner | None) -> dict[str, Any]:
        return {
            "context_scale": cond.scale if cond is not None else self.scale,
            "input_as_control": self.route_input,
            "persist_refs": self.persist_refs,
            "pending_control_frames": cond.pending_control if cond is not None else 0,
        }


def prepare(
    options: VaceOptions | None,
    settings: StreamSettings,
    requested: dict[str, Any],
    components: Components,
    media_dir: Path | None,
) -> tuple[StreamSettings, VaceSetup | None]:
    """The engine settings and VACE setup of a new stream; raises `VaceRefused` (nothing started).

    `settings`: the stream's resolved settings (its `mode` is what the client asked for: 'video' means an
    input video comes); `requested`: the fields the client set explicitly (an explicit stream batch is
    refused, an implicit one becomes 'none')."""
    if options is None or not options.enabled:
        return settings, None
    if components.vace is None:
        raise VaceRefused(
            "this server has no VACE module loaded: download it with `wanstream download --with-vace` and "
            "restart the server",
            status=503,
        )
    if components.wan_vae is None:
        raise VaceRefused("VACE encodes its inputs with the Wan VAE, which this server has not loaded")
    if "batching" in requested and (problem := conditioning_problem(requested["batching"])):
        raise VaceRefused(f"{problem} (leave settings.batching out and it is chosen)")
    references = [read_media_image(media_dir, n, "vace.ref_images") for n in options.ref_images or ()]
    route = options.use_input_video and settings.mode == "video"
    changes: dict[str, Any] = {"batching": CONDITIONED_BATCHING}
    if route:
        changes["mode"] = "text"  # the input steers generation from noise (Scope routes it to VACE)
    engine = settings.model_validate({**settings.model_dump(), **changes})
    setup = VaceSetup(
        scale=options.context_scale,
        route_input=route,
        references=references,
        persist_refs=options.persist_refs,
        media_dir=media_dir,
    )
    return engine, setup


def read_media_image(media_dir: Path | None, name: str, what: str) -> torch.Tensor:
    """An image of the media folder as uint8 [H, W, 3]; raises `VaceRefused` naming the field and the file."""
    try:
        check_image_name(name)
        path = resolve_media_path(media_dir, name)
    except SecurityError as exc:
        raise VaceRefused(f"{what}: {exc}", status=400) from None
    if not path.is_file():
        raise VaceRefused(
            f"{what}: no image {name!r} in the media folder (upload it: PUT /api/v1/media/{name})"
        )
    try:
        check_image_header(path)  # pixels from the header: a decompression bomb is never decoded
    except LimitExceeded as exc:
        raise VaceRefused(f"{what}: {name!r}: {exc}", status=413) from None
    except ValueError as exc:
        raise VaceRefused(f"{what}: {name!r} cannot be read as an image ({exc})") from None
    try:
        return read_image(path)
    except ImageReadError as exc:
        raise VaceRefused(f"{what}: {name!r} cannot be read as an image ({_tail(exc)})") from None


def _tail(exc: Exception) -> str:
    """The reason of a VaceInputError without the server path it starts with."""
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


def chunk_fields(cond: VaceConditioner | None, chunk: int, recent: dict[int, VaceChunk]) -> dict[str, Any]:
    """The VACE columns of a chunk's event-log row."""
    if cond is None:
        return {}
    row = recent.get(chunk)
    if row is None:
        return {}
    return {
        "vace_mode": row.mode,
        "vace_context_scale": row.scale,
        "vace_control_frames": row.control_frames,
        "vace_references": row.references,
    }
