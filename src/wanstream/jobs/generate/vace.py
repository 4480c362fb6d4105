"""VACE in `wanstream generate`: a control video (+ mask video), reference images and first/last frames.

Two stages, like the job itself (`wanstream.jobs.generate`):

* `plan_vace(...)` checks every VACE input before anything heavy happens — the videos are opened and their
  first frames decoded, the images read — and raises `VaceInputError` naming the flag and the file (mask
  size or length mismatch, a mask video in colour, an unreadable image, a scale outside [0, 2]).
* `VaceFeed` attaches a `VaceConditioner` to the job's session and hands it, before each chunk, exactly that
  chunk's control frames and masks (the last partial chunk padded with its last frame, as the main input is).

Frames line up by time: the control and mask videos are resampled onto the output's frame grid (i / fps,
nearest frame), so frame i of the output is steered by the control frame shown at its timestamp. Control
frames are resized to the output size the way the main input is (bilinear, stretched); masks with nearest
neighbours (they stay hard-edged). Masks are black and white: white (> 0.5) = generate, black = keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from wanstream.engine.vace import VaceChunk, VaceConditioner, VaceInputError
from wanstream.media.images import ImageReadError, read_image
from wanstream.media.resample import resample
from wanstream.media.video import Frame, VideoError, VideoInfo, VideoReader, resize_frames

if TYPE_CHECKING:
    from wanstream.engine.session import StreamSession
    from wanstream.jobs.generate.request import GenerateRequest
    from wanstream.timeline import Segment, Timeline

MAX_VACE_SCALE = 2.0
MAX_REFERENCES = 4  # Scope's UI takes up to four; each is one more context frame per chunk
# A mask frame whose channels differ by more than this (out of 255) anywhere is a colour video, not a mask
# (H.264's chroma subsampling leaves small differences along black/white edges, hence the margin).
GREY_TOLERANCE = 40


@dataclass(frozen=True)
class VacePlan:
    """The VACE inputs of one job, validated (images decoded, videos probed)."""

    control: VideoInfo | None  # the control video (its path is `control.path`)
    mask: VideoInfo | None  # the mask video, the same size as the control video
    references: tuple[Path, ...]
    reference_images: tuple[torch.Tensor, ...]  # uint8 [H, W, 3], as read
    references_once: bool  # Scope's one-shot references (first chunk only) instead of every chunk
    first_frame: Path | None
    first_image: torch.Tensor | None
    last_frame: Path | None
    last_image: torch.Tensor | None
    scale: float  # vace_context_scale where no timeline segment sets one
    corrected: bool  # the corrected numerics instead of Scope's (see docs/vace.md)
    control_is_input: bool  # text mode driven by the control video (it plays the input's role)

    def scale_for(self, segment: Segment) -> float:
        return self.scale if segment.vace_context_scale is None else segment.vace_context_scale

    def describe(self) -> str:
        parts = []
        if self.control is not None:
            what = "drives text mode" if self.control_is_input else "steers the input"
            parts.append(f"control {self.control.path} ({what})")
        if self.mask is not None:
            parts.append(f"masks {self.mask.path}")
        if self.references:
            when = "first chunk" if self.references_once else "every chunk"
            parts.append(f"{len(self.references)} reference image(s) ({when})")
        if self.first_frame is not None:
            parts.append(f"first frame {self.first_frame}")
        if self.last_frame is not None:
            parts.append(f"last frame {self.last_frame}")
        numerics = ", corrected numerics" if self.corrected else ""
        return "; ".join(parts) + f"; scale {self.scale:g}{numerics}"


def wants_vace(request: GenerateRequest) -> bool:
    """Whether a `GenerateRequest` names any VACE input."""
    fields = (
        request.control_video,
        request.mask_video,
        request.ref_images,
        request.first_frame,
        request.last_frame,
    )
    return any(bool(f) for f in fields)


def plan_vace(
    request: GenerateRequest, timeline: Timeline, *, control_is_input: bool, notes: list[str]
) -> VacePlan | None:
    """Validate the VACE inputs of a `GenerateRequest` (None when it has none); raises `VaceInputError`."""
    scales = [s.vace_context_scale for s in timeline.segments if s.vace_context_scale is not None]
    timeline_scale = timeline.settings.vace_context_scale
    if not wants_vace(request):
        extras = [flag for flag, on in _VACE_OPTIONS.items() if getattr(request, on)]
        if extras:
            raise VaceInputError(
                f"{', '.join(extras)} need a VACE input: --control-video, --ref-image, --first-frame or "
                "--last-frame"
            )
        if scales or timeline_scale is not None:
            notes.append("the timeline's vace_context_scale is not used: no VACE input was given")
        return None
    if request.mask_video and not request.control_video:
        raise VaceInputError(
            "--mask-video needs --control-video: masks say which pixels of the control frames to generate"
        )
    if request.ref_once and not request.ref_images:
        raise VaceInputError("--ref-once needs --ref-image")
    control = _probe("--control-video", request.control_video) if request.control_video else None
    mask = None
    if request.mask_video:
        assert control is not None
        mask = _check_mask(Path(request.mask_video), control)
    refs = tuple(Path(p) for p in request.ref_images or ())
    if len(refs) > MAX_REFERENCES:
        raise VaceInputError(f"--ref-image: at most {MAX_REFERENCES} reference images, got {len(refs)}")
    images = tuple(_image("--ref-image", p) for p in refs)
    first = Path(request.first_frame) if request.first_frame else None
    last = Path(request.last_frame) if request.last_frame else None
    scale = request.vace_scale if request.vace_scale is not None else timeline_scale
    return VacePlan(
        control=control,
        mask=mask,
        references=refs,
        reference_images=images,
        references_once=bool(request.ref_once),
        first_frame=first,
        first_image=_image("--first-frame", first) if first else None,
        last_frame=last,
        last_image=_image("--last-frame", last) if last else None,
        scale=1.0 if scale is None else _valid_scale(scale),
        corrected=bool(request.vace_corrected),
        control_is_input=control_is_input and control is not None,
    )


_VACE_OPTIONS = {  # flag → request field: options that mean nothing without a VACE input
    "--vace-scale": "vace_scale",
    "--vace-corrected": "vace_corrected",
    "--ref-once": "ref_once",
}


def check_length(plan: VacePlan, chunk_count: int | None) -> None:
    """First and last frame are one-shot extension chunks; both on one chunk would need 8 frames."""
    if plan.first_frame is not None and plan.last_frame is not None and chunk_count == 1:
        raise VaceInputError(
            "--first-frame and --last-frame together need at least two chunks (6 frames or more): "
            "StreamDiffusionV2's chunks hold 4 frames (5 for the first), too few for both"
        )


def _valid_scale(scale: float) -> float:
    if not 0.0 <= scale <= MAX_VACE_SCALE:  # NaN too
        raise VaceInputError(f"--vace-scale must be in [0, {MAX_VACE_SCALE:g}], got {scale}")
    return float(scale)


def _probe(flag: str, path: Path | str) -> VideoInfo:
    try:
        with VideoReader(path) as reader:
            return reader.info
    except VideoError as exc:
        raise VaceInputError(f"{flag}: {exc}") from None


def _image(flag: str, path: Path) -> torch.Tensor:
    try:
        return read_image(path)
    except ImageReadError as exc:
        raise VaceInputError(f"{flag}: {exc}") from None


def _check_mask(path: Path, control: VideoInfo) -> VideoInfo:
    """The mask video must match the control video in size and length and be black and white."""
    try:
        with VideoReader(path) as reader:
            info = reader.info
            first = next(iter(reader)).image
    except VideoError as exc:
        raise VaceInputError(f"--mask-video: {exc}") from None
    if (info.height, info.width) != (control.height, control.width):
        raise VaceInputError(
            f"--mask-video: mask size mismatch: {path} is {info.width}×{info.height} but the control video "
            f"{control.path} is {control.width}×{control.height}; masks must match their frames pixel for pixel"
        )
    spread = int((first.amax(dim=-1).int() - first.amin(dim=-1).int()).max())
    if spread > GREY_TOLERANCE:
        raise VaceInputError(
            f"--mask-video: {path} is in colour (its channels differ by up to {spread}/255 in frame 0); a mask "
            "has one channel: white = generate, black = keep"
        )
    length = _duration(info)
    control_length = _duration(control)
    if length is not None and control_length is not None:
        frame = 1.0 / min(info.fps, control.fps)
        if abs(length - control_length) > frame + 1e-6:
            raise VaceInputError(
                f"--mask-video: {path} lasts {length:.3f} s but the control video lasts {control_length:.3f} s; "
                "give one mask frame per control frame"
            )
    return info


def _duration(info: VideoInfo) -> float | None:
    if info.frame_count:
        return info.frame_count / info.fps
    return info.duration


# ---------------------------------------------------------------------------------------------------------
# Running


class VaceFeed:
    """The job's `VaceConditioner` and the control / mask streams that feed it chunk by chunk.

    Use as a context manager (it owns the video readers). `fps` is the output's frame rate: the control and
    mask videos are resampled onto its grid.
    """

    def __init__(self, plan: VacePlan, session: StreamSession, fps: float) -> None:
        self.plan = plan
        self.session = session
        self.height, self.width = session.settings.height, session.settings.width
        self.cond = VaceConditioner(
            session,
            scale=plan.scale,
            float32_sinusoid=not plan.corrected,
            pad_keys=not plan.corrected,
        )
        session.attach(self.cond)
        if plan.reference_images:
            self.cond.set_reference_images(list(plan.reference_images), persist=not plan.references_once)
        if plan.first_image is not None:
            self.cond.set_first_frame(plan.first_image)
        self.chunks: list[VaceChunk] = []  # what the conditioner did, per chunk (the run's VACE log)
        self._stack = contextlib.ExitStack()
        self._control: Iterator[Frame] | None = None
        self._masks: Iterator[Frame] | None = None
        self._fps = fps
        self._control_used = 0
        self._control_done = plan.control is None

    def __enter__(self) -> VaceFeed:
        plan = self.plan
        if plan.control is not None and not plan.control_is_input:
            self._control = self._on_grid(plan.control)
        if plan.mask is not None:
            self._masks = self._on_grid(plan.mask)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # -- before each chunk -------------------------------------------------------------------------
    def push_control(self, n: int, take: int | None = None) -> int:
        """Queue n control frames (and masks) for the chunk about to run: the next `take` (default n) of the
        control video, padded with the last one. Returns how many were real (0: the control video has ended,
        and the chunk runs without it)."""
        if self._control is None or self._control_done:
            return 0
        frames = []
        for _ in range(n if take is None else take):
            frame = next(self._control, None)
            if frame is None:
                self._control_done = True
                break
            frames.append(frame.image)
        if not frames:
            return 0
        real = len(frames)
        masks = self.masks(real)
        batch = resize_frames(torch.stack(frames), self.height, self.width)
        if real < n:  # pad like the main input's last chunk
            batch = torch.cat([batch, batch[-1:].expand(n - real, -1, -1, -1)])
            masks = None if masks is None else torch.cat([masks, masks[-1:].expand(n - real, -1, -1)])
        self.cond.push_control(batch, masks)
        self._control_used += real
        return real

    def masks(self, n: int) -> torch.Tensor | None:
        """The next n masks as [n, H, W] float in [0, 1] at the output size (None without a mask video)."""
        if self._masks is None:
            return None
        out = []
        for _ in range(n):
            frame = next(self._masks, None)
            if frame is None:
                raise VaceInputError(
                    f"--mask-video: {self.plan.mask.path} ended before the control video "  # type: ignore[union-attr]
                    f"(after {self._control_used + len(out)} frames): give one mask frame per control frame"
                )
            out.append(frame.image)
        grey = torch.stack(out).float().mean(dim=-1) / 255.0  # [n, h, w]
        if tuple(grey.shape[1:]) != (self.height, self.width):
            grey = F.interpolate(grey[:, None], size=(self.height, self.width), mode="nearest-exact")[:, 0]
        return grey

    def control_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Control frames that drive text mode (the job's input), at the output size."""
        return resize_frames(frames, self.height, self.width)

    def set_last_frame(self) -> None:
        """The chunk about to run is the video's last: extension mode 'lastframe' on it."""
        if self.plan.last_image is None:
            return
        self.cond.set_last_frame(self.plan.last_image)

    def set_scale(self, scale: float) -> None:
        self.cond.set_scale(scale)

    def collect(self, since_chunk: int) -> None:
        """Keep the conditioner's records of the chunks after `since_chunk` (its own log is bounded)."""
        self.chunks.extend(c for c in self.cond.history if c.chunk > since_chunk)

    # -- helpers -----------------------------------------------------------------------------------
    def _on_grid(self, info: VideoInfo) -> Iterator[Frame]:
        """A video's frames resampled onto the output's grid i / fps (nearest frame by time)."""
        reader = self._stack.enter_context(VideoReader(info.path))
        return resample(iter(reader), self._fps, 1.0 / reader.info.fps)


def chunks_to_json(chunks: Sequence[VaceChunk]) -> list[dict[str, Any]]:
    return [
        {
            "chunk": c.chunk,
            "mode": c.mode,
            "scale": c.scale,
            "control_frames": c.control_frames,
            "references": c.references,
            "context_frames": c.context_frames,
        }
        for c in chunks
    ]


def scale_changes(chunks: Sequence[VaceChunk]) -> list[tuple[int, float]]:
    """(chunk, new scale) wherever the scale differs from the chunk before (the first chunk included)."""
    out: list[tuple[int, float]] = []
    for c in chunks:
        if not out or out[-1][1] != c.scale:
            out.append((c.chunk, c.scale))
    return out
