"""TAEHV, the tiny autoencoder for Wan 2.1 (`taew2_1.pth`), read top to bottom.

Parameter names follow `taew2_1.pth` (a flat state dict: `encoder.{i}.*`, `decoder.{i}.*`; 128 tensors,
11,315,539 parameters at full size), so the official file loads strictly. Only 2-D convolutions: time is
handled by three kinds of blocks that the runner below treats specially.

* `MemBlock(x, past)` — three 3×3 convs over `cat[x, past]` plus a skip; `past` is the block's *input* at
  the previous time step (zeros at the start of a stream). One frame of memory per block.
* `TPool(s)` — folds `s` consecutive frames into channels with a 1×1 conv (encoder: s = 2, 2, 1).
* `TGrow(s)` — unfolds channels into `s` frames with a 1×1 conv (decoder: s = 1, 2, 2).

Layouts (as upstream): video is **NTCHW in [0, 1]**; latents are `[N, T/4, 16, H/8, W/8]`. The latents are
the *normalised* Wan latents — TAEHV encodes and decodes exactly what the diffusion model works in.

Whole clips (`encode_video`, `decode_video`) are the StreamDiffusionV2 copy exactly: no padding (T must
be a multiple of 4), no trimming of the decoder's first frames, unclamped output. `parallel=True` runs all
frames through one block at a time; `parallel=False` steps one input frame at a time through every block
(the frames a TGrow makes from it go on together; each MemBlock's memory is carried in a `TemporalMemory`).
Both give the same result.

Streaming (the state objects belong to the session; the module keeps no per-stream state):

* `stream_decode_windowed` + `TAEWindowedDecodeState` — StreamDiffusionV2's `stream_decode_to_pixel`
  convention, exactly: the first call decodes its latents and emits the last (T−1)·4 frames (2 latents →
  4 frames, one fewer than the Wan VAE's 5); later calls decode [last 3 latents + new] from scratch and
  emit the last 4·new frames. Pixels are mapped x·2 − 1 and clamped to [−1, 1].
* `stream_decode` + `TAEDecodeState` — ours, the fast one: MemBlock memory is carried between calls, so
  each call decodes only its new latents (¼ of the windowed work in steady state) with the same frame
  counts. TGrow needs no state: a call consumes every frame it grows. It equals the whole-clip decode of every latent so far. The windowed convention does not: each
  call restarts from zero memory 3 latents back, while the decoder's receptive field reaches 8 latents
  back (3 MemBlocks at the latent rate, 3 more after TGrow(1), 3 at twice the latent rate), so it sees a
  truncated past. With `context_latents=8` the windowed output equals the fast one (tested).
  Measured on CPU, float32, `tae_roundtrip` golden weights (tiny, seeded random), same latents fed to
  both: while the window still covers the whole stream (the first 4 latents) the two agree to 5e-6;
  after that, the golden's session 0 (2+1+1+2+1 latents) differs by max |Δ| 0.097 / 0.099 and mean |Δ|
  0.0058 / 0.0090 on its last two calls (pixels in [−1, 1]), and 24 N(0, 1) latents fed one per call
  differ by max 0.15, mean 0.0093. Widening the window shrinks the gap: max 0.15, 0.043, 0.0052, 6e-4,
  3e-5, 4e-6 for context_latents 3…8. These are random weights; the real taew2_1 weights were not at hand,
  so the gap on them is unmeasured. Either way the fast decoder is the one that equals a whole-clip decode.
  CPU time per 1-latent call (full size, 128×128 pixels, float32, 2 cores): windowed 3.6 s sequential /
  1.6 s parallel, fast 0.36 s.
* `stream_encode` + `TAEEncodeState` — ours (StreamDiffusionV2 never encodes with TAEHV): the Wan
  encoder's chunk rule, first call 1 + 4k frames → 1 + k latents, later calls 4k → k. Pixels are in the
  pipeline's [−1, 1], NTCHW (mapped to [0, 1] here). Streaming outputs come in the model's dtype.

How the streaming encode's latents relate to the Wan encoder's. TAEHV groups frames [4i, 4i+3] into
latent i, but that latent stands for the frames Wan's latent i covers, [4i−3, 4i]: upstream pads a clip
at the *end* to a multiple of 4 and trims the decoder's first 3 frames, so the encoder has 3 frames of
lookahead. A live stream has no lookahead, so the first call is padded at the *front* with 3 copies of
frame 0 (1 + 4k frames → 4 + 4k → 1 + k latents) and every later group of 4 lines up with a latent. Frame
counts then match the Wan path call for call, and decoding gives the same counts as after a Wan encode;
the price is content: the latents are those of the stream delayed by 3 frames (latent 1 stands for frames
[0, 0, 0, 1] instead of [1..4]; latent 0 is frame 0 either way), so pictures come out 3 frames later
(about 190 ms at 16 fps). Aligning exactly would need a whole chunk of delay instead.
The values: TAEHV latents approximate the *normalised* Wan posterior mean, (μ − mean)/std with the 16
Wan constants, while StreamDiffusionV2 feeds its DiT the raw μ. To stand in for `WanVAE.stream_encode`,
convert with `wan_mu_from_taehv` (z·std + mean); `taehv_from_wan_mu` is the inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wanstream.models.vae import WAN_LATENT_MEAN, WAN_LATENT_STD


@dataclass(frozen=True)
class TAEHVConfig:
    """Constructor arguments of TAEHV (defaults: the real `taew2_1.pth`)."""

    latent_channels: int = 16
    image_channels: int = 3
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    decoder_time_upscale: tuple[bool, bool] = (True, True)
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)

    def __post_init__(self) -> None:
        for name, n in (
            ("encoder_time_downscale", 3),
            ("decoder_time_upscale", 2),
            ("decoder_space_upscale", 3),
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(f"TAEHVConfig.{name} needs {n} flags, got {getattr(self, name)!r}")
        if len(self.decoder_widths) != 4:
            raise ValueError(f"TAEHVConfig.decoder_widths needs 4 widths, got {self.decoder_widths!r}")

    @classmethod
    def taew2_1(cls, width_divisor: int = 1) -> TAEHVConfig:
        """The real network, with every internal width divided by `width_divisor` (the golden cases use 4)."""
        base = cls()
        if width_divisor < 1 or any(w % width_divisor for w in (base.encoder_width, *base.decoder_widths)):
            raise ValueError(
                f"width_divisor {width_divisor} does not divide the TAEHV widths 64/256/128/64/64"
            )
        return cls(
            encoder_width=base.encoder_width // width_divisor,
            decoder_widths=tuple(w // width_divisor for w in base.decoder_widths),  # type: ignore[arg-type]
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TAEHVConfig:
        """From our own field names or a golden manifest's `model_config`.

        The manifest spells the decoder widths `decoder_n_f`, nests the reference's constructor flags under
        `constructor_args`, and may give only `width_divisor`; explicit widths win but must agree with it.
        """
        flat = {**data, **data.get("constructor_args", {})}
        if "decoder_n_f" in flat:
            flat.setdefault("decoder_widths", flat["decoder_n_f"])
        divisor = flat.get("width_divisor")
        if divisor is not None:
            scaled = cls.taew2_1(int(divisor))
            flat.setdefault("encoder_width", scaled.encoder_width)
            flat.setdefault("decoder_widths", scaled.decoder_widths)
            given = (int(flat["encoder_width"]), tuple(int(w) for w in flat["decoder_widths"]))
            if given != (scaled.encoder_width, scaled.decoder_widths):
                raise ValueError(
                    f"widths {given} disagree with width_divisor {divisor} "
                    f"({scaled.encoder_width}, {scaled.decoder_widths})"
                )
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items() if k in known}
        return cls(**kwargs)

    @property
    def time_downscale(self) -> int:
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def time_upscale(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)


# ------------------------------------------------------------------------------------------------
# Blocks. Frame-wise blocks take [B, C, H, W]; TPool and TGrow take [N, T, C, H, W].
# ------------------------------------------------------------------------------------------------
def conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of latents to (−3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """ReLU(conv(ReLU(conv(ReLU(conv(cat[x, past]))))) + skip(x))."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(2 * n_in, n_out), nn.ReLU(inplace=True), conv3x3(n_out, n_out), nn.ReLU(inplace=True),
            conv3x3(n_out, n_out),
        )  # fmt: skip
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x), inplace=True)


class TPool(nn.Module):
    """[N, T, C, H, W] → [N, T/s, C, H, W]: each group of `s` frames folded into channels, then 1×1 conv."""

    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width * stride, width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c, h, w = x.shape
        return self.conv(x.reshape(n * t // self.stride, self.stride * c, h, w)).reshape(
            n, t // self.stride, c, h, w
        )


class TGrow(nn.Module):
    """[N, T, C, H, W] → [N, T·s, C, H, W]: a 1×1 conv to s·C channels, unfolded into `s` frames in order."""

    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width, width * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c, h, w = x.shape
        return self.conv(x.flatten(0, 1)).reshape(n, t * self.stride, c, h, w)


def build_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    """Indices are the checkpoint's: `encoder.{i}`."""
    w = cfg.encoder_width
    layers: list[nn.Module] = [conv3x3(cfg.image_channels, w), nn.ReLU(inplace=True)]
    for pool in cfg.encoder_time_downscale:
        layers += [TPool(w, 2 if pool else 1), conv3x3(w, w, stride=2, bias=False)]
        layers += [MemBlock(w, w), MemBlock(w, w), MemBlock(w, w)]
    layers.append(conv3x3(w, cfg.latent_channels))
    return nn.Sequential(*layers)


def build_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    """Indices are the checkpoint's: `decoder.{i}`. Time strides 1, 2, 2 (the first stage never grows)."""
    n_f = cfg.decoder_widths
    grow = (False, *cfg.decoder_time_upscale)
    layers: list[nn.Module] = [Clamp(), conv3x3(cfg.latent_channels, n_f[0]), nn.ReLU(inplace=True)]
    for stage in range(3):
        w = n_f[stage]
        layers += [MemBlock(w, w), MemBlock(w, w), MemBlock(w, w)]
        layers.append(nn.Upsample(scale_factor=2) if cfg.decoder_space_upscale[stage] else nn.Identity())
        layers += [TGrow(w, 2 if grow[stage] else 1), conv3x3(w, n_f[stage + 1], bias=False)]
    layers += [nn.ReLU(inplace=True), conv3x3(n_f[3], cfg.image_channels)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------
# Running blocks over time
# ------------------------------------------------------------------------------------------------
@dataclass
class TemporalMemory:
    """What one stream carries through one half of TAEHV (encoder or decoder) from one call to the next.

    Slot i belongs to block i: a MemBlock keeps its last input frame [N, 1, C, H, W]; a TPool keeps the
    frames still waiting for a full group [N, k, C, H, W]. An empty memory is the start of a stream.
    """

    slots: dict[int, torch.Tensor] = field(default_factory=dict)

    def reset(self) -> None:
        self.slots.clear()


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, memory: TemporalMemory) -> torch.Tensor | None:
    """Run x [N, T, C, H, W] through `blocks`, all frames at once per block, continuing `memory`.

    Returns [N, T', C', H', W'], or None while a TPool still waits for the rest of its group.
    """
    n = x.shape[0]
    for i, block in enumerate(blocks):
        if isinstance(block, MemBlock):
            prev = memory.slots.get(i)
            if prev is None:
                prev = x.new_zeros(n, 1, *x.shape[2:])
            past = torch.cat([prev, x[:, :-1]], 1) if x.shape[1] > 1 else prev
            memory.slots[i] = x[:, -1:]
            x = block(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (n, -1))
        elif isinstance(block, TPool):
            pending = memory.slots.pop(i, None)
            if pending is not None:
                x = torch.cat([pending, x], 1)
            ready = x.shape[1] - x.shape[1] % block.stride
            if ready < x.shape[1]:
                memory.slots[i] = x[:, ready:]
            if ready == 0:
                return None
            x = block(x[:, :ready])
        elif isinstance(block, TGrow):
            x = block(x)
        else:
            x = block(x.flatten(0, 1)).unflatten(0, (n, -1))
    return x


def run_blocks_sequential(blocks: nn.Sequential, x: torch.Tensor, memory: TemporalMemory) -> torch.Tensor:
    """Like `run_blocks`, stepping one input frame at a time (memory use independent of T)."""
    outs = [y for t in range(x.shape[1]) if (y := run_blocks(blocks, x[:, t : t + 1], memory)) is not None]
    if not outs:
        raise ValueError(f"{x.shape[1]} frame(s) produced no output: a TPool group is still incomplete")
    return torch.cat(outs, 1)


# ------------------------------------------------------------------------------------------------
# Streaming state (owned by the session)
# ------------------------------------------------------------------------------------------------
@dataclass
class TAEDecodeState:
    """Fast streaming decode: the decoder's MemBlock memory, carried from call to call.

    `warmup_frames` is how many frames the first call of a stream drops: 4 (default) gives the
    StreamDiffusionV2 counts ((T−1)·4 on the first call); 3 gives upstream TAEHV's `frames_to_trim`,
    i.e. 4T − 3 frames in all, the Wan VAE's 1 + 4k (the engine uses this so output count = input count).
    """

    memory: TemporalMemory = field(default_factory=TemporalMemory)
    shape: tuple[int, ...] | None = None  # [N, C, h, w] of the stream's latents, fixed at its first call
    warmup_frames: int | None = None  # None: the decoder's time upscale (4)

    def reset(self) -> None:
        self.memory.reset()
        self.shape = None


@dataclass
class TAEEncodeState:
    """Streaming encode: the encoder's MemBlock memory, carried from call to call."""

    memory: TemporalMemory = field(default_factory=TemporalMemory)
    shape: tuple[int, ...] | None = None  # [N, C, H, W] of the stream's frames, fixed at its first call

    def reset(self) -> None:
        self.memory.reset()
        self.shape = None


@dataclass
class TAEWindowedDecodeState:
    """StreamDiffusionV2's decode convention: the last `context_latents` latents, re-decoded every call."""

    context_latents: int = 3
    context: torch.Tensor | None = None
    first: bool = True

    def reset(self) -> None:
        self.context = None
        self.first = True


def _frame_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0], *x.shape[2:])


def _check_stream(x: torch.Tensor, channels: int, shape: tuple[int, ...] | None, what: str) -> None:
    if x.ndim != 5 or x.shape[2] != channels:
        raise ValueError(f"{what}: expected [N, T, {channels}, H, W] (NTCHW), got {tuple(x.shape)}")
    if shape is not None and _frame_shape(x) != shape:
        raise ValueError(
            f"{what}: this stream started with [N, C, H, W] = {list(shape)} but got {list(_frame_shape(x))}; "
            "reset the state to start a new stream"
        )


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class TAEHV(nn.Module):
    def __init__(self, config: TAEHVConfig | None = None) -> None:
        super().__init__()
        self.config = config or TAEHVConfig()
        self.encoder = build_encoder(self.config)
        self.decoder = build_decoder(self.config)

    def _dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    # -- whole clips (StreamDiffusionV2's TAEHV, exactly) -----------------------------------------
    def encode_video(self, x: torch.Tensor, parallel: bool = True) -> torch.Tensor:
        """[N, T, 3, H, W] in [0, 1] → latents [N, T/4, 16, H/8, W/8]; T must be a multiple of 4."""
        _check_stream(x, self.config.image_channels, None, "encode_video")
        step = self.config.time_downscale
        if x.shape[1] == 0 or x.shape[1] % step:
            raise ValueError(
                f"encode_video needs a positive multiple of {step} frames, got {x.shape[1]}; pad the clip "
                "(e.g. repeat its last frame) or use stream_encode"
            )
        run = run_blocks if parallel else run_blocks_sequential
        out = run(self.encoder, x, TemporalMemory())
        assert out is not None  # a multiple of every TPool stride always completes
        return out

    def decode_video(self, z: torch.Tensor, parallel: bool = True) -> torch.Tensor:
        """Latents [N, T, 16, h, w] → [N, 4T, 3, 8h, 8w], ~[0, 1], unclamped and untrimmed."""
        _check_stream(z, self.config.latent_channels, None, "decode_video")
        if z.shape[1] == 0:
            raise ValueError("decode_video needs at least one latent frame")
        run = run_blocks if parallel else run_blocks_sequential
        out = run(self.decoder, z, TemporalMemory())
        assert out is not None  # the decoder has no TPool
        return out

    # -- streaming decode, StreamDiffusionV2's convention ------------------------------------------
    def stream_decode_windowed(
        self, z: torch.Tensor, state: TAEWindowedDecodeState, parallel: bool = False
    ) -> torch.Tensor:
        """StreamDiffusionV2's `stream_decode_to_pixel`: latents [N, T, 16, h, w] → frames NTCHW in [−1, 1].

        First call: decode `z`, emit the last (T−1)·4 frames. Later calls: decode [context + z] from
        scratch, emit the last 4·T. The context becomes the last `context_latents` latents decoded.
        `parallel=False` is the reference wrapper's default (both modes agree).
        """
        started = not state.first and state.context is not None
        shape = _frame_shape(state.context) if started else None
        _check_stream(z, self.config.latent_channels, shape, "stream_decode_windowed")
        if z.shape[1] == 0:
            raise ValueError("stream_decode_windowed needs at least one latent frame")
        if state.context_latents < 1:
            raise ValueError(f"context_latents must be at least 1, got {state.context_latents}")
        latents = z.to(self._dtype())
        if started:
            window, emitted = torch.cat([state.context.to(latents.device), latents], 1), z.shape[1]
        else:
            window, emitted = latents, z.shape[1] - 1
        video = self.decode_video(window, parallel=parallel)
        state.first = False
        state.context = window[:, -state.context_latents :].clone()
        # The reference slices a literal 4 frames per latent, also for decoders built without time upscale.
        video = video[:, -emitted * 4 :] if emitted else video[:, :0]
        return video.mul(2).sub(1).clamp(-1, 1)

    # -- streaming decode, fast (ours) --------------------------------------------------------------
    def stream_decode(self, z: torch.Tensor, state: TAEDecodeState) -> torch.Tensor:
        """Latents [N, T, 16, h, w] → frames NTCHW in [−1, 1], decoding only `z` (memory carried over).

        Same frame counts as `stream_decode_windowed`: the first call of a stream emits the last
        (T−1)·4 frames (the first latent's frames warm the decoder up), later calls 4·T.
        """
        _check_stream(z, self.config.latent_channels, state.shape, "stream_decode")
        if z.shape[1] == 0:
            raise ValueError("stream_decode needs at least one latent frame")
        first = state.shape is None
        video = run_blocks(self.decoder, z.to(self._dtype()), state.memory)
        assert video is not None
        state.shape = _frame_shape(z)
        if first:
            warmup = self.config.time_upscale if state.warmup_frames is None else state.warmup_frames
            video = video[:, warmup:]
        return video.mul(2).sub(1).clamp(-1, 1)

    # -- streaming encode (ours) ---------------------------------------------------------------------
    def stream_encode(self, video: torch.Tensor, state: TAEEncodeState) -> torch.Tensor:
        """Frames NTCHW in [−1, 1] → TAEHV latents (normalised Wan latents; see `wan_mu_from_taehv`).

        First call of a stream: 1 + 4k frames → 1 + k latents (frame 0 repeated 3 times in front, see the
        module docstring); later calls: 4k frames → k latents.
        """
        _check_stream(video, self.config.image_channels, state.shape, "stream_encode")
        step, t = self.config.time_downscale, video.shape[1]
        first = state.shape is None
        if first and t % step != 1:
            raise ValueError(f"stream_encode: the first call of a stream needs 1 + {step}k frames, got {t}")
        if not first and (t == 0 or t % step):
            raise ValueError(
                f"stream_encode: calls after the first need a positive multiple of {step} frames, got {t}"
            )
        x = (video.to(self._dtype()) * 0.5 + 0.5).clamp(0, 1)
        if first:
            x = torch.cat([x[:, :1].expand(-1, step - 1, -1, -1, -1), x], 1)
        latents = run_blocks(self.encoder, x, state.memory)
        assert latents is not None  # whole groups only
        state.shape = _frame_shape(video)
        return latents


# ------------------------------------------------------------------------------------------------
# TAEHV latents ↔ the Wan encoder's raw posterior mean
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _wan_scale(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 1, len(WAN_LATENT_MEAN), 1, 1)
    mean = torch.tensor(WAN_LATENT_MEAN, dtype=torch.float32).view(shape).to(device, dtype)
    std = torch.tensor(WAN_LATENT_STD, dtype=torch.float32).view(shape).to(device, dtype)
    return mean, std


def wan_mu_from_taehv(z: torch.Tensor) -> torch.Tensor:
    """TAEHV latents [N, T, 16, h, w] (normalised) → the raw Wan μ StreamDiffusionV2 feeds its DiT."""
    mean, std = _wan_scale(z.device, z.dtype)
    return z * std + mean


def taehv_from_wan_mu(mu: torch.Tensor) -> torch.Tensor:
    """Raw Wan μ [N, T, 16, h, w] → normalised latents, TAEHV's (and the Wan decoder's) input."""
    mean, std = _wan_scale(mu.device, mu.dtype)
    return (mu - mean) / std
