"""VACE on a live stream: control video + masks, reference images and first/last frames per chunk.

`VaceConditioner` is a `ChunkConditioner` for `StreamSession`. It queues control frames (and masks)
that are consumed chunk by chunk like the main input (5 frames for a stream's first chunk, then 4),
keeps reference images (encoded once, reused while they persist), and turns what each chunk has into
the 96-channel VACE context exactly as Daydream Scope's `VaceEncodingBlock` does:

* control frames (+ masks; none means all ones): m = mask > 0.5; the VAE encodes the *inactive* pixels
  frames·(1−m) and the *reactive* pixels frames·m (unnormalised latents, 16 + 16 channels); the raw mask
  becomes 64 channels, one per pixel of each 8×8 block, resampled to the latent frame rate
  (nearest-exact); reference latents (+16 zero channels, zero mask channels) go in front;
* reference images alone (R2V): the reference latents padded with 80 zero channels;
* first / last frame: a 4-frame group showing the image (mask 0) over the control frames (or zeros,
  mask 1), then the masked path above.

Scope picks the first that applies: first/last frame, control frames, reference images. Reference
images and first/last frames are one-shot like Scope's (they apply to the next chunk) unless given with
`persist=True`; `vace_context_scale` applies from the next chunk. Every input is validated when it is
given, before any work, so a rejected one leaves the stream as it was.

Scope behaviours reproduced (QUIRK where they happen): the Wan VAE's single streaming encoder cache is
shared by the inactive and reactive encodes and restarted by every cached encode of a stream's first
chunk (Scope clears it until the first decode); a one-off (uncached) encode of a 4-frame chunk sees only
its first frame; an inpainting chunk's reactive encode is uncached.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from wanstream.engine.frames import FrameInput, as_frames, as_tensor
from wanstream.engine.journal import SessionJournal, recorded
from wanstream.models.dit import CrossKV
from wanstream.models.vace import VACE_IN_DIM, VaceExtension, VaceModule
from wanstream.models.vae import VAEEncodeState

if TYPE_CHECKING:
    from wanstream.engine.session import ChunkEvent, StreamSession

LATENT_CHANNELS = 16
MASK_CHANNELS = VACE_IN_DIM - 2 * LATENT_CHANNELS  # 64: one per pixel of an 8×8 block
SPACE_STRIDE = 8  # pixels per latent along height and width
TIME_STRIDE = 4  # frames per latent after a stream's first frame
EXTENSION_FRAMES = 4  # Scope: num_frame_per_block (1 for StreamDiffusionV2) × the VAE's 4 frames per latent

ImageSource = torch.Tensor | np.ndarray | Any  # Any: a PIL image
VaeCache = Literal["shared", "separate"]


class VaceInputError(ValueError):
    """A VACE input that cannot be used; nothing was queued or changed."""


# ------------------------------------------------------------------------------------------------
# Pixels in
# ------------------------------------------------------------------------------------------------
def image_pixels(image: ImageSource) -> torch.Tensor:
    """An [H, W, 3] / [H, W] image (uint8, or float in [0, 1]) → float32 [3, H, W] in [-1, 1].

    uint8 values are u8/255 mapped by (x − 0.5)/0.5, as Scope's loader. The engine reads no files: a caller
    with a path reads it first (`wanstream.media.images.read_image`)."""
    what = "reference image"
    if isinstance(image, (str, Path)):
        raise VaceInputError(
            f"{image}: the engine takes an image's pixels, not a path — read it with "
            "wanstream.media.images.read_image(path)"
        )
    try:
        x = as_tensor(image)
    except TypeError:
        raise VaceInputError(
            f"{what}: expected a tensor, a numpy array or a PIL image, got {type(image).__name__}"
        ) from None
    if x.dim() == 2:
        x = x[..., None].expand(-1, -1, 3)
    if x.dim() != 3 or x.shape[-1] not in (1, 3) or min(x.shape[:2]) < 1:
        raise VaceInputError(f"{what}: expected [H, W, 3] (or [H, W] grey), got {tuple(x.shape)}")
    x = x.expand(-1, -1, 3) if x.shape[-1] == 1 else x
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        _check_range(x, what)
        x = x.float()
    else:
        raise VaceInputError(f"{what}: expected uint8 or float values, got {x.dtype}")
    return ((x - 0.5) / 0.5).permute(2, 0, 1).contiguous()


def fill_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] → [3, height, width]: bilinear scale to cover the frame, then centre crop (Scope's crop-to-fill)."""
    h0, w0 = pixels.shape[1:]
    if (h0, w0) == (height, width):
        return pixels
    scale = max(height / h0, width / w0)
    # Scope truncates; a product that lands just under the target would leave the crop short, so clamp.
    nh, nw = max(int(h0 * scale), height), max(int(w0 * scale), width)
    resized = F.interpolate(pixels[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    top, left = (nh - height) // 2, (nw - width) // 2
    return resized[:, top : top + height, left : left + width]


def _check_range(x: torch.Tensor, what: str, lo: float = 0.0, hi: float = 1.0) -> None:
    low, high = torch.aminmax(x.detach().float())
    if not (lo <= float(low) and float(high) <= hi):  # one sync, at input time
        raise VaceInputError(
            f"{what}: values must lie in [{lo:g}, {hi:g}], got [{float(low):.3g}, {float(high):.3g}]"
        )


# ------------------------------------------------------------------------------------------------
# The 96 channels
# ------------------------------------------------------------------------------------------------
# encode(pixels [1, 3, T, H, W], stream) → unnormalised latents [1, 16, F, h, w]. `stream` names the
# streaming encoder cache to use ("inactive" / "reactive"), or None for a one-off encode (Scope's
# use_cache=False).
Encode = Callable[[torch.Tensor, str | None], torch.Tensor]


def masked_latents(
    frames: torch.Tensor, masks: torch.Tensor | None, encode: Encode, all_on: bool | None = None
) -> torch.Tensor:
    """frames [3, T, H, W] in [-1, 1], raw masks [1, T, H, W] in [0, 1] (None: ones) → z0 [32, F, h, w].

    `all_on` (every mask value > 0.5) may be given to avoid a device sync; it decides the reactive cache.
    """
    if masks is None:
        m = torch.ones_like(frames[:1])
        all_on = True
    else:
        m = (masks > 0.5).to(frames.dtype)
        if all_on is None:
            all_on = bool((masks > 0.5).all())
    inactive = encode((frames * (1 - m))[None], "inactive")
    # Scope: a chunk whose mask is not all on (inpainting, extension) encodes its reactive pixels
    # without the streaming cache.
    reactive = encode((frames * m)[None], "reactive" if all_on else None)
    return torch.cat([inactive[0], reactive[0]], dim=0)


def mask_channels(masks: torch.Tensor) -> torch.Tensor:
    """Raw masks [1, T, H, W] → [64, (T+3)//4, H/8, W/8]: channel = row·8 + column inside each 8×8 block,
    frames resampled nearest-exact to the latent frame count (Scope's vace_encode_masks)."""
    _, T, H, W = masks.shape
    h, w, s = H // SPACE_STRIDE, W // SPACE_STRIDE, SPACE_STRIDE
    m = masks[0].reshape(T, h, s, w, s).permute(2, 4, 0, 1, 3).reshape(s * s, T, h, w)
    frames = (T + TIME_STRIDE - 1) // TIME_STRIDE
    return F.interpolate(m[None], size=(frames, h, w), mode="nearest-exact")[0]


def vace_context(z0: torch.Tensor, m0: torch.Tensor, references: torch.Tensor | None = None) -> torch.Tensor:
    """z0 [32, F, h, w] + m0 [64, F, h, w] (+ reference latents [16, R, h, w] in front) → [96, R+F, h, w]."""
    if references is not None:
        refs = references.to(z0.dtype)
        z0 = torch.cat([torch.cat([refs, torch.zeros_like(refs)], dim=0), z0], dim=1)
        m0 = torch.cat([m0.new_zeros(m0.shape[0], refs.shape[1], *m0.shape[2:]), m0], dim=1)
    return torch.cat([z0, m0.to(z0.dtype)], dim=0)


def reference_context(references: torch.Tensor) -> torch.Tensor:
    """R2V: reference latents [16, R, h, w] → [96, R, h, w] (80 zero channels, no mask channels)."""
    pad = references.new_zeros(VACE_IN_DIM - references.shape[0], *references.shape[1:])
    return torch.cat([references, pad], dim=0)


def extension_frames(
    image: torch.Tensor,
    at_end: bool,
    frames: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    num_frames: int = EXTENSION_FRAMES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First/last-frame extension: the image [3, H, W] over a 4-frame group at the start or the end of
    `num_frames` frames (Scope's _build_extension_frames_and_masks).

    The base is the control frames / raw masks if given (first `num_frames`, padded with the last),
    else zeros with masks of ones. With control masks the image is composited where they are > 0.5;
    either way the group's masks become 0 (keep).
    """
    H, W = image.shape[1:]
    if frames is not None:
        base = _take_padded(frames, num_frames).clone()
        keep = (
            _take_padded(masks, num_frames).float().clone()
            if masks is not None
            else torch.ones(1, num_frames, H, W, device=frames.device)
        )
    else:
        base = image.new_zeros(3, num_frames, H, W)
        keep = torch.ones(1, num_frames, H, W, device=image.device)
    group = TIME_STRIDE
    start = num_frames - group if at_end else 0
    ref = image[:, None].to(base.dtype).expand(-1, group, -1, -1)
    if masks is not None:
        cond = _take_padded(masks, num_frames)[:, start : start + group]
        base[:, start : start + group] = torch.where(cond > 0.5, ref, base[:, start : start + group])
    else:
        base[:, start : start + group] = ref
    keep[:, start : start + group] = 0.0
    return base, keep


def _take_padded(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first n frames of [C, T, H, W], repeating the last when there are fewer."""
    if x.shape[1] >= n:
        return x[:, :n]
    return torch.cat([x, x[:, -1:].expand(-1, n - x.shape[1], -1, -1)], dim=1)


# ------------------------------------------------------------------------------------------------
# The encoder
# ------------------------------------------------------------------------------------------------
class VaceEncoder(Protocol):
    def __call__(self, pixels: torch.Tensor, state: VAEEncodeState | None) -> torch.Tensor:
        """pixels [1, 3, T, H, W] in [-1, 1] → unnormalised latents [1, 16, F, h, w]; state None: one-off."""
        ...


class WanVaceEncoder:
    """The Wan VAE as VACE's encoder, with Scope's `encode_to_latent(use_cache=...)` semantics."""

    def __init__(self, vae: Any) -> None:  # wanstream.models.vae.WanVAE
        self.vae = vae
        self._scratch = VAEEncodeState()  # one-off encodes reuse its buffers

    def __call__(self, pixels: torch.Tensor, state: VAEEncodeState | None) -> torch.Tensor:
        x = pixels.to(self.vae.dtype)
        T, n = x.shape[2], self.vae.config.time_stride
        if state is None:
            # QUIRK (Scope, use_cache=False): frame 0, then whole groups of 4 after it; so a 4-frame
            # chunk is encoded from its first frame alone.
            self._scratch.reset()
            return self.vae.stream_encode(x[:, :, : 1 + n * ((T - 1) // n)], self._scratch)
        if not state.started and T % n == 0:
            # A VACE stream that begins on a later (4-frame) chunk: its first frame stands in as the
            # causal encoder's frame 0, and that extra latent is dropped.
            return self.vae.stream_encode(torch.cat([x[:, :, :1], x], dim=2), state)[:, :, 1:]
        return self.vae.stream_encode(x, state)


# ------------------------------------------------------------------------------------------------
# The conditioner
# ------------------------------------------------------------------------------------------------
@dataclass
class _Control:
    frame: torch.Tensor  # [3, H, W] in [-1, 1] (grey maps repeated)
    mask: torch.Tensor | None  # [H, W] raw, in [0, 1]
    all_on: bool  # every mask value > 0.5 (True without a mask)


@dataclass
class _Images:
    pixels: list[torch.Tensor]  # [3, h0, w0] in [-1, 1], as given (fitted per resolution)
    persist: bool
    latents: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (H, W) → [16, R, h, w]


@dataclass
class VaceChunk:
    """What the conditioner did for one chunk (tests, stats, the CLI)."""

    chunk: int
    mode: str  # "none" | "conditioning" | "r2v" | "extension:firstframe" | "extension:lastframe"
    control_frames: int
    references: int
    scale: float
    context_frames: int  # frames of the 96-channel context (0: no hints this chunk)
    encodes: int  # VAE encode calls made for this chunk


class VaceConditioner:
    """VACE inputs of one `StreamSession` (attach with `session.attach(conditioner)`).

    A chunk takes control frames only when a whole chunk's worth is queued (5, then 4); with fewer it
    runs on whatever else is set (references, first/last frame) or without hints, and they wait.

    `vae_cache="shared"` (Scope with the Wan VAE) runs the inactive and reactive encodes through one
    streaming encoder cache; `"separate"` gives each its own (Scope's TAE path; cleaner continuity).
    `float32_sinusoid` / `pad_keys` select Scope's numerics (default) or the corrected ones, see
    `wanstream.models.vace.VaceExtension`.
    """

    def __init__(
        self,
        session: StreamSession,
        vace: VaceModule | None = None,
        *,
        encoder: VaceEncoder | None = None,
        scale: float = 1.0,
        vae_cache: VaeCache = "shared",
        float32_sinusoid: bool = True,
        pad_keys: bool = True,
        history: int = 256,
    ) -> None:
        c = session.components
        vace = vace if vace is not None else c.vace  # type: ignore[assignment]
        if not isinstance(vace, VaceModule):
            raise VaceInputError(
                "no VACE module: load one with wanstream.weights.vace.load_vace(...) into Components.vace"
            )
        if vace.config.dim != c.dit.config.dim or vace.vace_layers[-1] >= c.dit.config.num_layers:
            raise VaceInputError(
                f"the VACE module (width {vace.config.dim}, layers {list(vace.vace_layers)}) does not fit "
                f"this DiT (width {c.dit.config.dim}, {c.dit.config.num_layers} layers)"
            )
        encoder_given = encoder is not None
        if encoder is None:
            if c.wan_vae is None:
                raise VaceInputError("VACE encodes its inputs with the Wan VAE, which is not loaded")
            encoder = WanVaceEncoder(c.wan_vae)
        if vae_cache not in ("shared", "separate"):
            raise VaceInputError(f"vae_cache must be 'shared' or 'separate', got {vae_cache!r}")
        self.session = session
        self.vace = vace
        self.encoder = encoder
        self.vae_cache = vae_cache
        self.float32_sinusoid = float32_sinusoid
        self.pad_keys = pad_keys
        self.scale = self._valid_scale(scale)
        self.history: deque[VaceChunk] = deque(maxlen=history)
        self.last_extension: VaceExtension | None = None
        self._control: deque[_Control] = deque()
        self._refs: _Images | None = None
        self._extension: tuple[str, _Images] | None = None  # ("firstframe" | "lastframe", image)
        self._states = {"inactive": VAEEncodeState(), "reactive": VAEEncodeState()}
        self._text: tuple[tuple[int, int], CrossKV] | None = None
        self._chunks = 0  # chunks since the stream (re)started
        self._encodes = 0
        self._trim_next = 0  # flush: padding frames of the next chunk, cut from its output
        journal = session.journal
        if journal is not None:
            if vace is not c.vace or encoder_given:
                journal.mark_unreplayable("a VACE conditioner with its own module or encoder")
            journal.record("vace", "create", self.journal_spec(), None)

    @property
    def journal(self) -> SessionJournal | None:
        """The session's journal: this conditioner's changes are part of the session's story."""
        return self.session.journal

    def journal_spec(self) -> dict[str, Any]:
        """How to build this conditioner again on a replayed session (`VaceConditioner(session, **spec)`)."""
        return {
            "scale": self.scale,
            "vae_cache": self.vae_cache,
            "float32_sinusoid": self.float32_sinusoid,
            "pad_keys": self.pad_keys,
            "history": self.history.maxlen,
        }

    # --- inputs ----------------------------------------------------------------------------------
    @recorded("vace")
    def push_control(self, frames: FrameInput, masks: torch.Tensor | None = None) -> None:
        """Queue control frames (and their masks) for the coming chunks.

        frames: [T, H, W, C] (C = 3, or 1 for grey maps), uint8 or float in [0, 1] — the main input's
        layout, as a tensor, numpy array, PIL image or list of frames — or Scope's `vace_input_frames` [1, C, T, H, W] in [-1, 1]. masks: [T, H, W] (or
        [T, H, W, 1]) uint8 / float in [0, 1], or Scope's [1, 1, T, H, W]; 1 = generate, 0 = keep;
        None means all ones. Frames of another size than the stream's are resized when used.
        """
        items = self._control_items(frames, masks)
        self._control.extend(items)

    @recorded("vace")
    def set_reference_images(self, images: Sequence[ImageSource] | None, *, persist: bool = False) -> None:
        """Reference images (paths or [H, W, 3] tensors) for R2V / style; None clears them.

        One-shot (Scope's behaviour) unless `persist`: then every chunk uses them, encoded once."""
        if images is None:
            self._refs = None
            return
        if isinstance(images, (str, Path, torch.Tensor, np.ndarray)) or hasattr(images, "convert"):
            images = [images]
        if not images:
            raise VaceInputError("set_reference_images needs at least one image (None clears them)")
        self._refs = _Images([image_pixels(im) for im in images], persist)

    @recorded("vace")
    def set_first_frame(self, image: ImageSource | None, *, persist: bool = False) -> None:
        """Extension mode 'firstframe' on the next chunk: the image as the chunk's start (None clears)."""
        self._set_extension("firstframe", image, persist)

    @recorded("vace")
    def set_last_frame(self, image: ImageSource | None, *, persist: bool = False) -> None:
        """Extension mode 'lastframe' on the next chunk: the image as the chunk's end (None clears)."""
        self._set_extension("lastframe", image, persist)

    @recorded("vace")
    def set_scale(self, scale: float) -> None:
        """`vace_context_scale` in [0, 2] for the chunks from the next one on (0 still computes hints)."""
        self.scale = self._valid_scale(scale)

    @recorded("vace")
    def clear(self) -> None:
        """Drop queued control frames, reference images and extension frames (scale kept)."""
        self._control.clear()
        self._refs = None
        self._extension = None

    @property
    def pending_control(self) -> int:
        """Control frames queued and not yet used."""
        return len(self._control)

    @property
    def frames_needed(self) -> int:
        """Control frames the next chunk uses: 5 on a stream's first chunk, then 4."""
        return 5 if self._chunks == 0 else 4

    # --- text mode: control frames in, generated frames out ---------------------------------------
    @recorded("vace")
    def push(self, frames: FrameInput, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Text mode (Scope's VACE default): queue control frames and generate every complete chunk.

        Returns the generated frames ready now (the session's output format)."""
        self._check_driving()
        self.push_control(frames, masks)
        outputs = []
        while len(self._control) >= self.frames_needed:
            outputs.append(self.session.generate(1))
        return self._concat(outputs)

    @recorded("vace")
    def flush(self) -> torch.Tensor:
        """End of the control video: pad its last partial chunk with its last frame, generate it (the
        padding cut from the output), and end the stream (the next frames start a new one)."""
        self._check_driving()
        out = self._empty()
        if self._control:
            pad = self.frames_needed - len(self._control)
            self._control.extend([self._control[-1]] * pad)
            self._trim_next = pad
            out = self.session.generate(1)
        self.session.reset()
        return out

    # --- ChunkConditioner --------------------------------------------------------------------------
    def reset(self) -> None:
        """The stream restarts: encoder caches and chunk count start over (queued inputs are kept)."""
        for state in self._states.values():
            state.reset()
        self._chunks = 0

    def extension_for(self, event: ChunkEvent) -> VaceExtension:
        s = self.session.settings
        stream_start = event.stream_start
        if self._trim_next:
            event.trim, self._trim_next = self._trim_next, 0  # the session cuts them from the output
        if stream_start:
            self._chunks = 0
        needed = self.frames_needed
        size = (s.height, s.width)
        self._encodes = 0
        with self._stage("vace_encode"):
            control = self._take_control(needed, size) if len(self._control) >= needed else None
            context, mode, refs = self._context(control, size, stream_start)
        self._chunks += 1
        text = self._text_kv() if context is not None else None
        ext = VaceExtension(
            self.vace,
            context,
            text,
            self.scale,
            float32_sinusoid=self.float32_sinusoid,
            pad_keys=self.pad_keys,
        )
        self.last_extension = ext
        self.history.append(
            VaceChunk(
                chunk=event.chunk,
                mode=mode,
                control_frames=0 if control is None else control[0].shape[1],
                references=refs,
                scale=self.scale,
                context_frames=0 if context is None else context.shape[1],
                encodes=self._encodes,
            )
        )
        return ext

    # --- per chunk -------------------------------------------------------------------------------
    def _context(
        self,
        control: tuple[torch.Tensor, torch.Tensor | None, bool] | None,
        size: tuple[int, int],
        stream_start: bool,
    ) -> tuple[torch.Tensor | None, str, int]:
        """The chunk's 96-channel context (None: no VACE this chunk), its mode and reference count."""
        c = self.session.components
        refs = self._refs
        encode = self._encoder_for(stream_start)
        if self._extension is not None:
            which, images = self._extension
            if not images.persist:
                self._extension = None
            image = fill_crop(images.pixels[0], *size).to(c.device, self._dtype)
            frames, masks = extension_frames(
                image,
                at_end=which == "lastframe",
                frames=None if control is None else control[0],
                masks=None if control is None else control[1],
            )
            z0 = masked_latents(frames, masks.to(frames.dtype), encode, all_on=False)
            m0 = mask_channels(masks.to(frames.dtype))
            context = vace_context(z0, m0, self._reference_latents(size))
            mode = f"extension:{which}"
        elif control is not None:
            frames, masks, all_on = control
            z0 = masked_latents(frames, masks, encode, all_on=all_on)
            m0 = mask_channels(masks if masks is not None else torch.ones_like(frames[:1]))
            context = vace_context(z0, m0, self._reference_latents(size))
            mode = "conditioning"
        elif refs is not None:
            context = reference_context(self._reference_latents(size))  # type: ignore[arg-type]
            mode = "r2v"
        else:
            return None, "none", 0
        n_refs = 0 if refs is None else len(refs.pixels)
        if refs is not None and not refs.persist:
            self._refs = None  # Scope clears one-shot references after the chunk that used them
        return context.to(c.dtype), mode, n_refs

    def _encoder_for(self, stream_start: bool) -> Encode:
        dtype = self.session.components.dtype

        def encode(pixels: torch.Tensor, stream: str | None) -> torch.Tensor:
            self._encodes += 1
            if stream is None:
                return self.encoder(pixels, None).to(dtype)
            state = self._states["inactive" if self.vae_cache == "shared" else stream]
            if self.vae_cache == "shared" and stream_start:
                # QUIRK (Scope): its Wan VAE wrapper restarts the streaming encoder on every cached encode
                # until the stream's first decode, so on a first chunk each cached encode starts afresh.
                state.reset()
            return self.encoder(pixels, state).to(dtype)

        return encode

    def _reference_latents(self, size: tuple[int, int]) -> torch.Tensor | None:
        """[16, R, h, w]: each reference fitted to the frame and encoded alone (cached per resolution)."""
        refs = self._refs
        if refs is None:
            return None
        if size not in refs.latents:
            c = self.session.components
            encode = self._encoder_for(False)
            latents = [
                encode(fill_crop(p, *size).to(c.device, self._dtype)[:, None][None], None)[0]
                for p in refs.pixels
            ]
            refs.latents = {size: torch.cat(latents, dim=1)}
        return refs.latents[size]

    def _take_control(self, n: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """The next n control frames as [3, n, H, W], raw masks [1, n, H, W] (None: all ones), all-on flag."""
        items = [self._fit(self._control.popleft(), size) for _ in range(n)]
        dtype = self._dtype
        frames = torch.stack([it.frame for it in items], dim=1).to(dtype)
        masks = None
        if any(it.mask is not None for it in items):
            ones = frames.new_ones(size)
            masks = torch.stack([ones if it.mask is None else it.mask.to(dtype) for it in items])[None]
        return frames, masks, all(it.all_on for it in items)

    @staticmethod
    def _fit(item: _Control, size: tuple[int, int]) -> _Control:
        """A control frame pushed at another resolution than the stream's (now) runs at."""
        if tuple(item.frame.shape[1:]) == size:
            return item
        frame = F.interpolate(
            item.frame[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )
        mask = None
        if item.mask is not None:
            mask = F.interpolate(item.mask[None, None], size=size, mode="nearest-exact")[0, 0]
        return _Control(frame[0], mask, item.all_on)

    def _text_kv(self) -> CrossKV:
        prompt = self.session.prompt
        if prompt.embedding is None:
            raise VaceInputError("no prompt set: the VACE blocks attend the prompt too")
        key = (prompt.version, id(prompt.embedding))
        if self._text is None or self._text[0] != key:
            self._text = (key, self.vace.text_kv(self.session.components.dit, prompt.embedding))
        return self._text[1]

    @property
    def _dtype(self) -> torch.dtype:
        return self.session.components.dtype

    # --- validation ----------------------------------------------------------------------------------
    def _control_items(self, frames: torch.Tensor, masks: torch.Tensor | None) -> list[_Control]:
        """Validate control frames and masks; → per-frame items on the device ([3, H, W] in [-1, 1])."""
        if not isinstance(frames, torch.Tensor):  # numpy arrays, PIL images, lists of frames
            try:
                frames = as_frames(frames, channels=(1, 3))
            except (TypeError, ValueError) as exc:
                raise VaceInputError(f"control frames: {exc}") from None
        device = self.session.components.device
        if frames.dim() == 5:  # Scope's vace_input_frames [1, C, T, H, W] in [-1, 1]
            if frames.shape[0] != 1 or frames.shape[1] not in (1, 3):
                raise VaceInputError(
                    f"control frames [B, C, T, H, W] must have B = 1 and C = 3 (or 1), got {tuple(frames.shape)}"
                )
            if not frames.is_floating_point():
                raise VaceInputError("control frames [1, C, T, H, W] must be float in [-1, 1]")
            pixels = frames[0].transpose(0, 1).to(device, torch.float32, non_blocking=True)  # [T, C, H, W]
            _check_range(pixels, "control frames", -1.0, 1.0)
        elif frames.dim() == 4:  # [T, H, W, C], the main input's layout
            if frames.shape[-1] not in (1, 3):
                raise VaceInputError(
                    f"control frames [T, H, W, C] need C = 3 (RGB) or 1 (grey), got C = {frames.shape[-1]}"
                )
            x = frames.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                pixels = x.float() / 127.5 - 1.0  # the main input's u8 → [-1, 1] mapping
            elif x.is_floating_point():
                _check_range(x, "control frames")
                pixels = x.float() * 2.0 - 1.0
            else:
                raise VaceInputError(f"control frames must be uint8 or float, got {frames.dtype}")
            pixels = pixels.permute(0, 3, 1, 2)
        else:
            raise VaceInputError(
                f"control frames must be [T, H, W, C] or [1, C, T, H, W], got {tuple(frames.shape)}"
            )
        T, _, H, W = pixels.shape
        if T == 0:
            raise VaceInputError("no control frames given")
        if H % 16 or W % 16:
            raise VaceInputError(f"control frames are {H}x{W}; height and width must be multiples of 16")
        pixels = pixels.expand(-1, 3, -1, -1)  # grey maps are repeated to RGB (a view)
        raw = self._masks(masks, T, H, W)
        if raw is None:
            return [_Control(pixels[t], None, True) for t in range(T)]
        on = (raw > 0.5).flatten(1).all(1).tolist()  # one sync, at input time
        return [_Control(pixels[t], raw[t], bool(on[t])) for t in range(T)]

    def _masks(self, masks: torch.Tensor | None, T: int, H: int, W: int) -> torch.Tensor | None:
        """Masks as [T, H, W] float in [0, 1], checked against the frames."""
        if masks is None:
            return None
        if not isinstance(masks, torch.Tensor):
            raise VaceInputError(f"masks must be a tensor, got {type(masks).__name__}")
        shape = tuple(masks.shape)
        if masks.dim() == 5:
            if shape[:2] != (1, 1):
                raise VaceInputError(f"masks [B, C, T, H, W] must have B = 1 and C = 1, got {shape}")
            m = masks[0, 0]
        elif masks.dim() == 4:
            if shape[-1] != 1:
                raise VaceInputError(f"masks [T, H, W, C] must have one channel, got C = {shape[-1]}")
            m = masks[..., 0]
        elif masks.dim() == 3:
            m = masks
        else:
            raise VaceInputError(f"masks must be [T, H, W] (or [1, 1, T, H, W]), got {shape}")
        if tuple(m.shape) != (T, H, W):
            raise VaceInputError(
                f"mask size mismatch: masks are {tuple(m.shape)} (T, H, W) but the frames are {(T, H, W)}"
            )
        m = m.to(self.session.components.device, non_blocking=True)
        if m.dtype == torch.uint8:
            return m.float() / 255
        if not m.is_floating_point():
            raise VaceInputError(f"masks must be uint8 or float in [0, 1], got {m.dtype}")
        _check_range(m, "masks")
        return m.float()

    def _set_extension(self, which: str, image: ImageSource | None, persist: bool) -> None:
        if image is None:
            if self._extension is not None and self._extension[0] == which:
                self._extension = None
            return
        if self._extension is not None and self._extension[0] != which:
            raise VaceInputError(
                "first and last frame on the same chunk ('firstlastframe') needs 8 frames per chunk; "
                "StreamDiffusionV2 chunks hold 4. Set one of them (clear the other with None)."
            )
        self._extension = (which, _Images([image_pixels(image)], persist))

    @staticmethod
    def _valid_scale(scale: float) -> float:
        try:
            value = float(scale)
        except (TypeError, ValueError):
            raise VaceInputError(f"vace_context_scale must be a number in [0, 2], got {scale!r}") from None
        if not 0.0 <= value <= 2.0:  # also rejects NaN
            raise VaceInputError(f"vace_context_scale must be in [0, 2], got {value}")
        return value

    def _check_driving(self) -> None:
        if self.session.conditioner is not self:
            raise VaceInputError("attach the conditioner first: session.attach(conditioner)")
        if self.session.prompt.embedding is None:
            raise VaceInputError(
                "set the prompt first (session.set_prompts): the VACE stream generates from it"
            )
        if self.session.settings.mode != "text":
            raise VaceInputError(
                "push() drives text mode (control frames in, generated frames out); in video mode queue "
                "control frames with push_control() and feed the input video to session.push()"
            )

    def _stage(self, name: str) -> AbstractContextManager[Any]:
        timer = self.session.stage_timer
        return timer(name) if timer is not None else nullcontext()

    def _concat(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        outputs = [o for o in outputs if o.shape[0]]
        if not outputs:
            return self._empty()
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _empty(self) -> torch.Tensor:
        s = self.session.settings
        dtype = torch.uint8 if self.session.output == "uint8" else torch.float32
        return torch.empty((0, s.height, s.width, 3), dtype=dtype, device=self.session.components.device)
