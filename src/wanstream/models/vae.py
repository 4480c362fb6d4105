"""The Wan2.1 video VAE, whole-clip and streaming, read top to bottom.

Parameter names follow the official `Wan2.1_VAE.pth` (a plain state dict of Wan's `WanVAE_`: 194 tensors,
126,892,531 parameters), so a strict load works on the file as released.

Latents and normalisation: the asymmetry to keep in mind
---------------------------------------------------------
* `encode` / `stream_encode` return the encoder's raw posterior mean μ, **not normalised**. That is what
  StreamDiffusionV2 feeds its DiT (its `stream_encode` runs with `is_scale=False`).
* `decode` / `stream_decode` take **normalised** latents z and de-normalise them first. The DiT's output is
  treated as normalised.
* `normalize(mu) = (mu - mean) * (1/std)` and `denormalize(z) = z / (1/std) + mean`, with the 16 Wan constants
  and `1/std` computed once in float32, exactly the reference arithmetic (decode divides by the rounded
  reciprocal; it does not multiply by std). The official Wan `WanVAE.encode` is `normalize(encode(video))`.

Time: the VAE is causal in time and compresses it ×4 (×8 in space). Frame 0 is encoded alone and every later
group of 4 frames gives one latent: 1 + 4k frames ↔ 1 + k latents. Decoding mirrors it: latent 0 → 1 frame, each
later latent → 4 frames.

Streaming chunk rule. A stream is a sequence of calls on one `VAEEncodeState` / `VAEDecodeState`:
* encode: a session's first call takes 1 + 4k frames (StreamDiffusionV2: 1 + 4 → 2 latents), every later call
  4k frames (4 → 1 latent);
* decode: a session's first call takes n ≥ 1 latents → 1 + 4(n − 1) frames (2 → 5), later calls n → 4n frames.
Chunked like this a stream reproduces the whole-clip `encode` / `decode` bit for bit: those are a stream on a
fresh state, and every layer (the 1×1×1 `conv1`/`conv2` included) runs per chunk of 4 frames / per latent, so
the shapes do not depend on how a stream is cut into calls.
`state.reset()` starts a new session (the reference's `first_encode = first_decode = True`).

Stream state. Every causal conv with a temporal kernel of 3 owns a slot holding the last 2 frames of its input,
which replace the causal zero padding on the next chunk; the encoder's time downsampler keeps the last frame.
The slots live in the state objects, not in the modules, so one loaded VAE serves any number of streams. On a
session's first chunk nothing is read: convs see zero padding, the time downsampler passes frame 0 through and
the time upsampler skips its time conv (1 latent → 1 frame, its slot starts as zeros for the next chunk).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wanstream.models import numerics
from wanstream.models.fastpath import COMPILES, FALLBACKS, GATE, GIL, CompiledOrEager

# Per-channel latent statistics of Wan2.1's VAE (identical in Wan2.1, StreamDiffusionV2 and diffusers).
WAN_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    """Constructor arguments of the Wan VAE (defaults: the released `Wan2.1_VAE.pth`)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN_LATENT_STD

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one flag per downsampling stage ({len(self.dim_mult) - 1} for "
                f"dim_mult {self.dim_mult}); got {self.temporal_downsample}"
            )
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean and latent_std need z_dim = {self.z_dim} values each")
        if min(self.latent_std) <= 0:
            raise ValueError("latent_std values must be positive")

    @property
    def time_stride(self) -> int:
        """Frames per latent after the first (4 for Wan2.1)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def space_stride(self) -> int:
        """Pixels per latent along height and width (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WanVAEConfig:
        """From the reference `WanVAE_` constructor arguments (as golden manifests record them) or our names.

        Wan's spelling `temperal_downsample` is accepted. `attn_scales` must be empty and `dropout` 0: the
        reference cannot run attention inside its stages, and this VAE is inference-only.
        """
        args = dict(data)
        if args.pop("attn_scales", None):
            raise ValueError(
                "attn_scales must be empty (the reference VAE only has attention in its middle blocks)"
            )
        if args.pop("dropout", 0.0):
            raise ValueError("dropout must be 0.0: the VAE is inference-only")
        if "temperal_downsample" in args:
            args["temporal_downsample"] = args.pop("temperal_downsample")
        unknown = sorted(set(args) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown Wan VAE config keys: {', '.join(unknown)}")
        for key in ("dim_mult", "temporal_downsample", "latent_mean", "latent_std"):
            if key in args:
                args[key] = tuple(args[key])
        return cls(**args)


# ------------------------------------------------------------------------------------------------
# Stream state: the causal caches one stream owns
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CausalCache:
    """Per-stream caches of the encoder or the decoder: one tensor per cached layer, in forward order.

    `started` is False until a session's first chunk has run; while it is False layers write their slots
    without reading them. Buffers are kept across `reset()` and overwritten in place when the next session
    has the same geometry, so their addresses stay stable.
    """

    slots: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    started: bool = False
    geometry: tuple[int, int, int] | None = None  # (batch, height, width) of the running session's input

    def reset(self) -> None:
        """Start a new session: the next call is a first chunk again."""
        self.started = False
        self.geometry = None

    def read(self, slot: int) -> torch.Tensor:
        tensor = self.slots[slot]
        if tensor is None:
            raise RuntimeError(
                f"cache slot {slot} is empty in a started session (was the state used by another VAE?)"
            )
        return tensor

    def store(self, slot: int, value: torch.Tensor) -> None:
        buf = self.slots[slot]
        if (
            buf is not None
            and buf.shape == value.shape
            and buf.dtype == value.dtype
            and buf.device == value.device
        ):
            buf.copy_(value)
        else:
            self.slots[slot] = value.clone()

    def store_zeros(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> None:
        buf = self.slots[slot]
        if buf is not None and buf.shape == shape and buf.dtype == like.dtype and buf.device == like.device:
            buf.zero_()
        else:
            self.slots[slot] = like.new_zeros(shape)

    def begin(self, num_slots: int, geometry: tuple[int, int, int]) -> None:
        if len(self.slots) != num_slots:
            self.slots = [None] * num_slots
        self.geometry = geometry


class VAEEncodeState(CausalCache):
    """Encoder caches of one stream (24 slots at full size). `reset()` starts a new session."""


class VAEDecodeState(CausalCache):
    """Decoder caches of one stream (32 slots at full size). `reset()` starts a new session."""


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def canonical_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` in channels-last-3d with the strides a fresh tensor of its shape has. `contiguous()` keeps a slice's
    strides on size-1 dims (the batch), and compiled graphs guard on every stride."""
    c, t, h, w = x.shape[1:]
    if x.stride() == (c * t * h * w, 1, h * w * c, w * c, c):
        return x
    return x.clone(memory_format=torch.channels_last_3d)


def frames_as_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] → [B·T, C, H, W] for per-frame 2-D layers (a view for channels-last-3d input)."""
    return x.transpose(1, 2).flatten(0, 1)


def batch_as_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B·T, C, H, W] → [B, C, T, H, W]."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """A 3-D conv that is causal in time: it sees `context` past frames and no future ones.

    Spatial padding is the usual 'same' padding. The past frames come from this layer's slot in the stream
    state (zeros on a session's first chunk), and the last `context` frames of its input go back there.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: tuple[int, int, int] = (3, 3, 3)) -> None:
        kt, kh, kw = kernel_size
        super().__init__(in_dim, out_dim, kernel_size, padding=(0, kh // 2, kw // 2))
        self.context = kt - 1
        self.slot = -1  # numbered by `number_slots`

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:  # type: ignore[override]
        y, past = self.step(x, cache.read(self.slot) if cache.started else None)
        cache.store(self.slot, past)
        return y

    def step(self, x: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv over [past, x] (zero padding without a past) and the new past: its input's last frames."""
        x = torch.cat([past, x], dim=2) if past is not None else F.pad(x, (0, 0, 0, 0, self.context, 0))
        return super().forward(x), x[:, :, -self.context :]


class RMSNorm(nn.Module):
    """Wan's `RMS_norm`: L2-normalise over channels (eps 1e-12), times √C and a learned gain.

    Not a mean-square RMSNorm; the result is the same up to that eps. `ndim` is the input's rank (5 for
    videos, 4 for the per-frame attention), which sets the gain's broadcast shape in the checkpoint.
    """

    def __init__(self, dim: int, ndim: int = 5) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * (ndim - 2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Positions 0, 2, 3, 6 hold the checkpoint's tensors; 1, 4 (SiLU) and 5 (dropout) have none.
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        # The block's math is a pure function of tensors; the stream state is read and written around it.
        self.step = residual_step

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        conv1, conv2 = self.residual[2], self.residual[6]
        pasts = (cache.read(conv1.slot), cache.read(conv2.slot)) if cache.started else (None, None)
        y, past1, past2 = self.step(self, x, *pasts)
        cache.store(conv1.slot, past1)
        cache.store(conv2.slot, past2)
        return y


def residual_step(
    block: ResidualBlock, x: torch.Tensor, past1: torch.Tensor | None, past2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """norm → SiLU → causal conv, twice, plus the shortcut; returns the output and both convs' new pasts."""
    norm1, _, conv1, norm2, _, _, conv2 = block.residual
    h, new1 = conv1.step(F.silu(norm1(x)), past1)
    h, new2 = conv2.step(F.silu(norm2(h)), past2)
    return h + block.shortcut(x), new1, new2


class AttentionBlock(nn.Module):
    """Single-head self-attention inside each frame, over its h·w positions (head dim = channels)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, ndim=4)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape
        qkv = self.to_qkv(self.norm(frames_as_batch(x)))  # [B·T, 3C, h, w]
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).contiguous().chunk(3, dim=-1)  # [B·T, 1, hw, C]
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).unflatten(2, (h, w))
        return batch_as_frames(self.proj(y), b) + x


class Downsample(nn.Module):
    """Halve height and width (pad right/bottom, 3×3 stride-2 conv per frame). With `temporal`, also halve time:
    a stride-2 conv over [the previous chunk's last frame, this chunk], so 4 frames → 2 → 1."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.slot = -1  # numbered by `number_slots` when temporal

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = batch_as_frames(self.resample(frames_as_batch(x)), x.shape[0])
        if not self.temporal:
            return x
        if not cache.started:
            # Frame 0 is a chunk of its own: it passes through and becomes the next chunk's context.
            cache.store(self.slot, x[:, :, -1:])
            return x
        x_in = torch.cat([cache.read(self.slot), x], dim=2)
        cache.store(self.slot, x[:, :, -1:])
        return self.time_conv(x_in)


class Upsample(nn.Module):
    """Double height and width (nearest, then a 3×3 conv halving the channels). With `temporal`, first double
    time: a causal time conv makes 2C channels, which become two consecutive frames."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.temporal:
            if cache.started:
                x = self.time_conv(x, cache).unflatten(1, (2, c))  # [B, 2, C, T, h, w]
                x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame 2i, 2i+1 = halves of i
            else:
                # Latent 0 gives one frame; the time conv first runs on the next chunk, over zero context.
                cache.store_zeros(self.time_conv.slot, (b, c, self.time_conv.context, h, w), like=x)
        return batch_as_frames(self.resample(frames_as_batch(x)), b)


def number_slots(root: nn.Module) -> int:
    """Give every cached layer under `root` its slot index, in forward order; returns how many."""
    count = 0
    for module in root.modules():
        if isinstance(module, CausalConv3d) or (isinstance(module, Downsample) and module.temporal):
            module.slot = count
            count += 1
    return count


# ------------------------------------------------------------------------------------------------
# Encoder and decoder (one chunk per call; the caller splits time into chunks)
# ------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0])
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.temporal_downsample):
                layers.append(Downsample(out_dim, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.ModuleList(layers)
        d = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d)])
        self.head = nn.ModuleList([RMSNorm(d), nn.SiLU(), CausalConv3d(d, 2 * cfg.z_dim)])  # μ and log σ²
        self.num_slots = number_slots(self)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        res1, attn, res2 = self.middle
        x = res2(attn(res1(x, cache)), cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0])
        d = dims[0]
        self.middle = nn.ModuleList([ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d)])
        layers: list[nn.Module] = []
        in_dim = dims[0]
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(temporal_upsample):
                layers.append(Upsample(out_dim, temporal=temporal_upsample[i]))
                in_dim = out_dim // 2
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.ModuleList([RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3)])
        self.num_slots = number_slots(self)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        res1, attn, res2 = self.middle
        x = res2(attn(res1(x, cache)), cache)
        for layer in self.upsamples:
            x = layer(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


# ------------------------------------------------------------------------------------------------
# The VAE
# ------------------------------------------------------------------------------------------------
class WanVAE(nn.Module):
    """Video [B, 3, T, H, W] in [-1, 1] ↔ latents [B, 16, T', H/8, W/8]. See the module docstring for the
    normalisation asymmetry (encode → raw μ, decode ← normalised z) and the streaming chunk rule."""

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or WanVAEConfig()
        self.encoder = Encoder(cfg)
        self.conv1 = nn.Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # → (μ, log σ²); only μ is used
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        # Not part of the checkpoint. Kept on the CPU (also when built on meta), copied per device/dtype on use.
        self._latent_mean = torch.tensor(cfg.latent_mean, dtype=torch.float32, device="cpu")
        self._latent_inv_std = 1.0 / torch.tensor(cfg.latent_std, dtype=torch.float32, device="cpu")
        self._scale_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def optimize(
        self, *, channels_last: bool = True, compile: bool = True, background: bool = True
    ) -> WanVAE:
        """GPU speed-ups that keep the arithmetic (up to rounding): channels-last convolutions, and the
        encoder and decoder compiled whole for steady-state chunks (eager, half the VAE's time went to
        norms, SiLUs, concatenations and cache copies over full-resolution activations; compiled they
        fuse: about 1.6x faster).

        Compiling takes tens of seconds per frame size. With `background` a stream never waits for it:
        chunks run eagerly while a background thread compiles (and warms up) for the stream's size,
        then switch to the compiled modules. Without it the first steady chunk compiles in line.
        """
        if channels_last:
            for m in self.modules():
                if isinstance(m, nn.Conv3d):
                    m.to(memory_format=torch.channels_last_3d)
                elif isinstance(m, nn.Conv2d):
                    m.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile:
            self._compiled = _CompiledHalves(
                CompiledOrEager(torch.compile(self.encoder, dynamic=False), self.encoder, "Wan VAE encoder"),
                CompiledOrEager(torch.compile(self.decoder, dynamic=False), self.decoder, "Wan VAE decoder"),
                background,
            )
        return self

    _compiled: _CompiledHalves | None = None

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until every background compile started so far has finished (tests, benchmarks): the VAE's,
        and the new shapes of other compiled functions (the DiT's, `fastpath.COMPILES`) a benchmark's steady
        window must not overlap."""
        done = self._compiled.wait(timeout) if self._compiled is not None else True
        return COMPILES.wait(timeout) and done

    # A session's first part (frame 0, latent 0) runs eagerly: a one-off shape not worth a graph. Its second part
    # (frames 1-4, latent 1) runs compiled like any later chunk: its input is cloned into the canonical
    # channels-last strides (a slice of the 5-frame input has another batch stride, and dynamo guards on every
    # stride: it recompiled, ~2 s, on every stream start), and the caches the eager part wrote are laid out as
    # the warm-up's were.
    def _encoder_for(self, x: torch.Tensor, steady: bool) -> Callable[..., torch.Tensor]:
        if self._compiled is None or not steady:
            return self.encoder
        return self._compiled.run_for("encoder", x, lambda: self._warm_encoder(x), self.encoder)

    def _decoder_for(self, z: torch.Tensor, steady: bool) -> Callable[..., torch.Tensor]:
        if self._compiled is None or not steady:
            return self.decoder
        return self._compiled.run_for("decoder", z, lambda: self._warm_decoder(z), self.decoder)

    def _warm_encoder(self, chunk: torch.Tensor) -> None:
        """Compile the steady-state encoder for `chunk`'s shape on a throwaway stream."""
        assert self._compiled is not None
        state = VAEEncodeState()
        dummy = _like(chunk)
        state.begin(self.encoder.num_slots, (chunk.shape[0], chunk.shape[3], chunk.shape[4]))
        first = dummy[:, :, :1]
        self.encoder(canonical_channels_last(first) if self.channels_last else first, state)
        state.started = True
        for _ in range(2):
            self._compiled.halves[0](dummy, state)

    def _warm_decoder(self, z: torch.Tensor) -> None:
        assert self._compiled is not None
        state = VAEDecodeState()
        dummy = _like(z)
        state.begin(self.decoder.num_slots, (z.shape[0], z.shape[3], z.shape[4]))
        self.decoder(dummy, state)
        state.started = True
        for _ in range(2):
            self._compiled.halves[1](dummy, state)

    channels_last = False  # set by `optimize`: inputs are laid out channels-last on entry

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # --- normalisation -------------------------------------------------------------------------
    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw μ → normalised latents: (μ − mean) · (1/std)."""
        mean, inv_std = self._scale(mu)
        return (mu - mean) * inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents → raw: z / (1/std) + mean (dividing by the float32 reciprocal, as the reference)."""
        mean, inv_std = self._scale(z)
        return z / inv_std + mean

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.ndim != 5 or like.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, T, h, w]; got {tuple(like.shape)}")
        key = (like.device, like.dtype)
        if key not in self._scale_tables:
            self._scale_tables[key] = tuple(  # type: ignore[assignment]
                t.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
                for t in (self._latent_mean, self._latent_inv_std)
            )
        return self._scale_tables[key]

    # --- whole clips ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Clip [B, 3, 1+4k, H, W] → raw posterior mean μ [B, z, 1+k, H/8, W/8]. NOT normalised."""
        return self.stream_encode(video, VAEEncodeState())

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """NORMALISED latents [B, z, n, h, w] → clip [B, 3, 1+4(n−1), 8h, 8w], clamped to [-1, 1] unless told not."""
        return self.stream_decode(z, VAEDecodeState(), clamp=clamp)

    # --- streams -------------------------------------------------------------------------------
    @torch.no_grad()
    def stream_encode(self, frames: torch.Tensor, state: VAEEncodeState) -> torch.Tensor:
        """Next frames of a stream → raw μ (NOT normalised), one latent per 4 frames plus one for frame 0.

        First call of a session: 1 + 4k frames (frame 0 is encoded alone). Later calls: 4k frames.
        """
        x = self._check_frames(frames, state)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        n = self.config.time_stride
        if state.started:
            chunks = [x[:, :, i : i + n] for i in range(0, x.shape[2], n)]
        else:
            chunks = [x[:, :, :1]] + [x[:, :, i : i + n] for i in range(1, x.shape[2], n)]
            state.begin(self.encoder.num_slots, (x.shape[0], x.shape[3], x.shape[4]))
        mu = []
        for chunk in chunks:
            # conv1 per chunk (the reference runs it once over the call): the same values, but every op sees
            # the same shapes however a stream is cut into calls, so a stream equals the whole clip bit for bit.
            if self.channels_last:  # one memory layout for every chunk: compiled graphs are stride-specific
                chunk = canonical_channels_last(chunk)
            mu.append(
                self.conv1(self._encoder_for(chunk, state.started)(chunk, state))[:, : self.config.z_dim]
            )
            state.started = True
        return torch.cat(mu, dim=2)

    @torch.no_grad()
    def stream_decode(self, z: torch.Tensor, state: VAEDecodeState, *, clamp: bool = True) -> torch.Tensor:
        """Next NORMALISED latents of a stream → frames in [-1, 1] (unless `clamp=False`).

        First call of a session: latent 0 → 1 frame, each further latent → 4. Later calls: 4 frames per latent.
        """
        z = self.denormalize(self._check_latents(z, state))
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        if not state.started:
            state.begin(self.decoder.num_slots, (z.shape[0], z.shape[3], z.shape[4]))
        out = []
        for i in range(z.shape[2]):  # conv2 per latent, for the same reason as conv1 in stream_encode
            latent = self.conv2(z[:, :, i : i + 1])
            if self.channels_last:
                latent = canonical_channels_last(latent)
            out.append(self._decoder_for(latent, state.started)(latent, state))
            state.started = True
        video = torch.cat(out, dim=2)
        return video.clamp_(-1.0, 1.0) if clamp else video

    # --- input checks (before any state is touched) ----------------------------------------------
    def _check_frames(self, frames: torch.Tensor, state: VAEEncodeState) -> torch.Tensor:
        if not isinstance(state, VAEEncodeState):
            raise TypeError(f"stream_encode needs a VAEEncodeState, got {type(state).__name__}")
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [B, 3, T, H, W] in [-1, 1]; got shape {tuple(frames.shape)}")
        b, _, t, h, w = frames.shape
        s, n = self.config.space_stride, self.config.time_stride
        if h % s or w % s:
            raise ValueError(f"frame height and width must be multiples of {s}; got {h}x{w}")
        if not state.started and (t - 1) % n:
            raise ValueError(
                f"a clip, or a stream session's first chunk, must hold 1 + {n}k frames (frame 0, then groups of "
                f"{n}); got {t}"
            )
        if state.started and (t == 0 or t % n):
            raise ValueError(
                f"after a session's first chunk, chunks must hold a positive multiple of {n} frames; got {t}"
            )
        self._check_common(frames, state, (b, h, w), "frames")
        return frames.to(self.dtype)

    def _check_latents(self, z: torch.Tensor, state: VAEDecodeState) -> torch.Tensor:
        if not isinstance(state, VAEDecodeState):
            raise TypeError(f"stream_decode needs a VAEDecodeState, got {type(state).__name__}")
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or z.shape[2] == 0:
            raise ValueError(
                f"latents must be [B, {self.config.z_dim}, T, h, w] with T >= 1 (normalised); got {tuple(z.shape)}"
            )
        self._check_common(z, state, (z.shape[0], z.shape[3], z.shape[4]), "latents")
        return z.to(self.dtype)

    def _check_common(
        self, x: torch.Tensor, state: CausalCache, geometry: tuple[int, int, int], what: str
    ) -> None:
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor; got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{what} are on {x.device} but the VAE is on {self.device}")
        if state.started and geometry != state.geometry:
            raise ValueError(
                f"this stream's session runs at (batch, height, width) = {state.geometry}, got {geometry}; "
                "call state.reset() to start a new session"
            )


def _like(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped, laid out and typed as `x`, and an inference tensor exactly when `x` is one."""
    with torch.inference_mode(x.is_inference()):
        return torch.zeros_like(x)


class _CompiledHalves:
    """The compiled encoder and decoder, and which input shapes they are ready for."""

    def __init__(self, encoder: CompiledOrEager, decoder: CompiledOrEager, background: bool) -> None:
        self.halves = (encoder, decoder)
        self.background = background
        self._ready: set[tuple] = set()
        self._scheduled: set[tuple] = set()  # shapes whose compile started, or starts after their first call
        self._started: dict[tuple, threading.Thread] = {}
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def run_for(
        self, half: str, x: torch.Tensor, warm: Callable[[], None], eager: Callable[..., torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        """What runs `x` now: the compiled half if it is ready for `x`'s shape, else `eager`. A shape met for
        the first time starts compiling in the background right after that eager call: started before it,
        the compile's warm-up and the call would time cuDNN's algorithms for the same convolutions at once,
        and whichever finished last would decide what every later call (and a take's replay) uses."""
        key = (half, tuple(x.shape), x.dtype, x.device)
        module = self.halves[0 if half == "encoder" else 1]
        call = numerics.next_call(("Wan VAE", key))
        if numerics.replaying():  # as the recorded call ran: eager, or compiled (in line if not ready yet)
            if self.errors or (numerics.owes_eager() and numerics.replay_eager(f"Wan VAE {key}", call)):
                return eager
            self._ready.add(key)
            return module
        if key in self._ready:
            return module
        if not self.background:
            self._ready.add(key)  # compiles in line on this call
            return module
        if call >= 0:
            numerics.note_eager(f"Wan VAE {key}", call)
        with self._lock:
            first = key not in self._scheduled and not self.errors
            self._scheduled.add(key)
        if not first:
            return eager

        def then_compile(*args: Any, **kwargs: Any) -> torch.Tensor:
            try:
                out = eager(*args, **kwargs)
            except BaseException:
                with self._lock:
                    self._scheduled.discard(key)  # the next call tries again
                raise
            self._start(key, half, warm, (torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return out

        return then_compile

    def _start(self, key: tuple, half: str, warm: Callable[[], None], mode: tuple[bool, bool]) -> None:
        # Not a daemon: a process that ends mid-compile waits for it (a daemon compile thread torn down at
        # exit aborted the process, seen on an H100).
        thread = threading.Thread(
            target=self._run, args=(key, warm, mode), daemon=False, name=f"compile-{half}"
        )
        with self._lock:
            self._started[key] = thread
        thread.start()

    def _run(self, key: tuple, warm: Callable[[], None], mode: tuple[bool, bool]) -> None:
        # Compiling launches kernels, loads modules and synchronises the device: never while another thread
        # captures a CUDA graph (the gate defers such captures until this is done). It runs in the stream's
        # inference / grad mode (`mode`), on inputs like the stream's (`_like`): dynamo guards on both, and a
        # warm-up in another mode left the stream to compile the half again, in line (seen on the CPU: a
        # stream pushed outside inference mode, as `bench` and a script do).
        inference, grad = mode
        try:
            with GATE.background(), GIL.held(), torch.inference_mode(inference), torch.set_grad_enabled(grad):
                warm()
                if key[3].type == "cuda":
                    torch.cuda.synchronize(key[3])
            self._ready.add(key)
        except Exception as exc:  # the eager path stays in use
            self.errors.append(exc)
            FALLBACKS.record("compile", f"Wan VAE {key[0]} warm-up", exc, "the eager VAE")

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            threads = list(self._started.values())
        for thread in threads:
            thread.join(timeout)
        return all(not t.is_alive() for t in threads)
