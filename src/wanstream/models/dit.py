"""The Wan2.1 text-to-video diffusion transformer (DiT), read top to bottom.

Parameter names follow the official checkpoints (`diffusion_pytorch_model.safetensors`, and the
StreamDiffusionV2 `model.pt` once its `model.` prefix is stripped), so `load_state_dict(strict=True)`
works on either. Two forwards share the weights:

* `forward_full` — the official bidirectional forward over whole clips (one timestep per sample).
* `forward_stream` — StreamDiffusionV2's causal streaming forward: one chunk of latent frames per lane,
  a timestep per frame, self-attention over a `KVCache` and cross-attention over cached text K/V.

The model predicts flow (noise − x0); converting to x0 is the scheduler's job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from wanstream.models import fp8
from wanstream.models.attention import attention
from wanstream.models.fastpath import CompiledOrEager
from wanstream.models.kv_cache import CallPlan, KVCache


@dataclass(frozen=True)
class WanConfig:
    """Constructor arguments of the Wan DiT (defaults: Wan2.1-T2V-1.3B)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    window_size: tuple[int, int] = (-1, -1)
    model_type: str = "t2v"

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.model_type != "t2v":
            raise ValueError(f"model_type {self.model_type!r} is not supported (only text-to-video 't2v')")
        if tuple(self.window_size) != (-1, -1):
            raise ValueError("only global attention (window_size (-1, -1)) is supported")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def t2v_1_3b(cls) -> WanConfig:
        return cls()

    @classmethod
    def t2v_14b(cls) -> WanConfig:
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WanConfig:
        """From a Wan `config.json` (diffusers omits five keys; their defaults apply) or a manifest.

        Unknown keys (`_class_name`, `_diffusers_version`, ...) are ignored.
        """
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("patch_size", "window_size"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> WanConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the model config: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads together), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def sinusoid(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos | sin] embedding of raw timesteps, computed in float64 as the reference does."""
    half = freq_dim // 2
    pos = t.to(torch.float64)
    arg = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half))
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class Rope:
    """3-D rotary embedding: per head, complex pairs split [time, height, width] = [c-2(c//3), c//3, c//3].

    Pairs are adjacent channels (x[2i], x[2i+1]), not rotate-half. Angles are built in float64 and
    applied in float32. Tables cover 1024 positions per axis (the reason for StreamDiffusionV2's
    periodic RoPE reset).
    """

    max_positions = 1024

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        c = head_dim // 2
        self.split = (c - 2 * (c // 3), c // 3, c // 3)
        d = head_dim
        dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))  # real dims per axis
        # Always on the CPU (also when the model is built on the meta device); copied per device on use.
        pos = torch.arange(self.max_positions, dtype=torch.float64, device="cpu")
        self._angles = [
            torch.outer(
                pos, 1.0 / torch.pow(theta, torch.arange(0, k, 2, dtype=torch.float64, device="cpu") / k)
            )
            for k in dims
        ]
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _table(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._tables:
            self._tables[device] = tuple(
                f(a).to(device=device, dtype=torch.float32)
                for a in self._angles
                for f in (torch.cos, torch.sin)
            )
        return self._tables[device]

    def freqs(self, start_frames: torch.Tensor, f: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, f*h*w, 1, head_dim/2] for frames start..start+f-1 of each lane."""
        cos_t, sin_t, cos_h, sin_h, cos_w, sin_w = self._table(start_frames.device)
        B = start_frames.shape[0]
        frames = start_frames[:, None] + torch.arange(f, device=start_frames.device)

        def grid(t_part: torch.Tensor, h_part: torch.Tensor, w_part: torch.Tensor) -> torch.Tensor:
            tt = t_part[frames][:, :, None, None, :].expand(B, f, h, w, -1)
            hh = h_part[:h][None, None, :, None, :].expand(B, f, h, w, -1)
            ww = w_part[:w][None, None, None, :, :].expand(B, f, h, w, -1)
            return torch.cat([tt, hh, ww], dim=-1).reshape(B, f * h * w, 1, -1)

        return grid(cos_t, cos_h, cos_w), grid(sin_t, sin_h, sin_w)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, S, H, D] by the given angles; returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, S, dim] with S = G*n; shift/scale [B, G, 1, dim]: one modulation per group of n tokens."""
    G = shift.shape[1]
    return (x.unflatten(1, (G, -1)) * (1 + scale) + shift).flatten(1, 2)


def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    G = g.shape[1]
    return (y.unflatten(1, (G, -1)) * g).flatten(1, 2)


class StreamExtension:
    """Hooks into `WanDiT.forward_stream` for conditioning modules (VACE): the base class does nothing.

    `begin` sees the patch-embedded chunk tokens [B, S, dim], the per-frame modulation e0 [B, F, 6, dim]
    and the token grid (f, h, w) before the first block; `after_block` may add to the hidden state after
    block `layer`. `time_sinusoid` replaces the timestep embedding's sinusoid.

    A CUDA graph of a DiT step replays fixed kernels over fixed buffers, so an extension that may be
    captured states what such a graph depends on: `graph_key` (everything that is not a tensor — modules,
    flags — and that changes the kernels), `graph_inputs` (every tensor a call reads, all of its per-call
    data) and `reading` (the same extension over other tensors: the graph's static copies, refreshed
    before each replay). The base class is never captured.
    """

    def graph_key(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        """What a captured step over the chunk latents x depends on besides the shapes of `graph_inputs`;
        None: calls with this extension run uncaptured. Raises ValueError where the extension does not
        fit x (checked before any capture, so bad input is not mistaken for a failed capture)."""
        return None

    def graph_inputs(self) -> list[torch.Tensor]:
        """The device tensors a call reads, in a fixed order (see `reading`)."""
        return []

    def reading(self, inputs: list[torch.Tensor]) -> StreamExtension:
        """This extension over `inputs` (same order, shapes and dtypes as `graph_inputs`) instead of its own."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in a captured graph")

    def time_sinusoid(self, freq_dim: int, t: torch.Tensor) -> torch.Tensor:
        return sinusoid(freq_dim, t)

    def begin(self, dit: WanDiT, tokens: torch.Tensor, e0: torch.Tensor, grid: tuple[int, int, int]) -> None:
        return None

    def after_block(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return h

    def clean_pass(self) -> StreamExtension | None:
        """The extension for the t = 0 cache-rewrite pass (`cache_context="clean"`); None: plain DiT."""
        return None


@dataclass
class CrossKV:
    """Text keys/values of every layer for one conditioning: [1, heads, text_len, head_dim] each."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)


class FusedQKV(NamedTuple):
    """q/k/v as one [3·dim, dim] weight (full width, or float8 values with `scale`): see `fuse_qkv`."""

    weight: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor | None
    float8_compute: bool


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

        self._fused: FusedQKV | None = None  # see `fuse_qkv`

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normalised), v as [B, S, H, D]."""
        shape = (*x.shape[:2], self.num_heads, self.head_dim)
        if (f := self._fused) is not None:
            q, k, v = fp8.linear(x, f.weight, f.bias, f.scale, float8_compute=f.float8_compute).chunk(
                3, dim=-1
            )
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return self.norm_q(q).view(shape), self.norm_k(k).view(shape), v.view(shape)

    def fuse_qkv(self) -> bool:
        """One [3·dim, dim] GEMM instead of three: q/k/v weights (and, in float8, their row scales) become
        views of one fused tensor.

        The state dict is unchanged (the views keep their names), and in-place weight edits (a merged
        LoRA) reach the fused tensor. Layers replaced by adapters (runtime LoRA) keep three GEMMs.
        """
        layers = (self.q, self.k, self.v)
        kinds = {(type(m), getattr(m, "float8_compute", False)) for m in layers}
        ((kind, float8_compute), *others) = kinds
        if others or kind not in (nn.Linear, fp8.Fp8Linear) or layers[0].weight.is_meta:
            self._fused = None
            return False
        if self._fused is None:
            stored = [fp8.stored_weight(m) for m in layers]
            weight = torch.cat([s[0].detach() for s in stored])
            bias = torch.cat([m.bias.detach() for m in layers])
            for m, w, b in zip(layers, weight.chunk(3), bias.chunk(3)):
                m.weight = nn.Parameter(w, requires_grad=False)
                m.bias = nn.Parameter(b, requires_grad=False)
            scale = None
            if len(stored[0]) == 2:  # float8: the row scales are fused the same way
                scale = torch.cat([s[1] for s in stored])
                for m, sc in zip(layers, scale.chunk(3)):
                    m.weight_scale = sc
            self._fused = FusedQKV(weight, bias, scale, float8_compute)
        return True

    def out(self, y: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] → projected [B, S, dim]."""
        return self.o(y.transpose(1, 2).flatten(2))


class CrossAttention(SelfAttention):
    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of an embedded context [1, T, dim] → [1, H, T, D] each."""
        shape = (*context.shape[:2], self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).view(shape).transpose(1, 2)
        v = self.v(context).view(shape).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim] against k/v [Bk, H, T, D]; Bk = 1 is shared by every lane."""
        B, S, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, S, self.num_heads, self.head_dim)
        if k.shape[0] == 1 and B > 1:
            # Every lane attends the same text: fold lanes into the query sequence.
            q = q.reshape(1, B * S, self.num_heads, self.head_dim)
        y = attention(q.transpose(1, 2), k, v)
        return self.o(y.transpose(1, 2).reshape(B, S, -1))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, S, dim]; e0 [B, G, 6, dim] (one modulation per group of S/G tokens).

        `attend(q, k, v)` ([B, S, H, D] each) runs RoPE and self-attention for the chosen forward
        (full clip, or against the KV cache) and returns [B, H, S, D].
        """
        q, k, v = self.attention_inputs(x, e0)
        return self.attention_outputs(x, attend(q, k, v), e0, cross_k, cross_v)

    def attention_inputs(
        self, x: torch.Tensor, e0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """First half of the block: modulated LayerNorm → q, k (RMS-normalised, not yet roped), v."""
        shift1, scale1 = (self.modulation[:, None] + e0).chunk(6, dim=2)[:2]
        return self.self_attn.qkv(modulate(self.norm1(x), shift1, scale1))

    def attention_outputs(
        self, x: torch.Tensor, y: torch.Tensor, e0: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor
    ) -> torch.Tensor:
        """Second half: the gated self-attention output y [B, H, S, D], cross-attention, the gated FFN."""
        _, _, gate1, shift2, scale2, gate2 = (self.modulation[:, None] + e0).chunk(6, dim=2)
        x = x + gate(self.self_attn.out(y), gate1)
        x = x + self.cross_attn(self.norm3(x), cross_k, cross_v)
        return x + gate(self.feed_forward(modulate(self.norm2(x), shift2, scale2)), gate2)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear → GELU(tanh) → Linear. On a GPU in half precision the GELU runs in the first GEMM's
        epilogue (cuBLASLt, tanh form) instead of as a separate pass over the 8960-wide activations."""
        up, act, down = self.ffn
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and type(up) is nn.Linear:
            h = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return down(h.unflatten(0, x.shape[:-1]))
        return down(act(up(x)))


class Head(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """e [B, G, dim]: the time embedding before projection (not e0)."""
        shift, scale = (self.modulation[:, None] + e[:, :, None]).chunk(2, dim=2)
        return self.head(modulate(self.norm(x), shift, scale))


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class WanDiT(nn.Module):
    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = Rope(cfg.head_dim)

    # --- shared pieces -----------------------------------------------------------------------------
    def embed_time(
        self, t: torch.Tensor, embed: Callable[[int, torch.Tensor], torch.Tensor] = sinusoid
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, G] raw timesteps → e [B, G, dim] and e0 [B, G, 6, dim]."""
        dtype = self.patch_embedding.weight.dtype
        e = self.time_embedding(embed(self.config.freq_dim, t.flatten()).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.config.dim))
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, T, text_dim] with T ≤ text_len → zero-padded to text_len, then embedded: [B, text_len, dim].

        Every padded row is attended (the reference passes no context lengths).
        """
        T = context.shape[1]
        if T > self.config.text_len:
            raise ValueError(f"text context has {T} tokens, more than text_len={self.config.text_len}")
        pad = context.new_zeros(context.shape[0], self.config.text_len - T, context.shape[2])
        return self.text_embedding(torch.cat([context, pad], dim=1).to(self.patch_embedding.weight.dtype))

    def cross_kv(self, context: torch.Tensor) -> CrossKV:
        """Per-layer cross-attention K/V of one conditioning [1, T, text_dim]: computed once per prompt."""
        ctx = self.embed_text(context)
        cache = CrossKV()
        for block in self.blocks:
            k, v = block.cross_attn.kv(ctx)
            cache.k.append(k)
            cache.v.append(v)
        return cache

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x [B, C, F, H, W] → tokens [B, f*h*w, dim] in (f, h, w) order, and the grid (f, h, w)."""
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, p*q*r*c] → [B, c, f*p, h*q, w*r] (channels fastest within a patch)."""
        c, (p, q, r), (f, h, w) = self.config.out_dim, self.config.patch_size, grid
        x = x[:, : f * h * w].reshape(x.shape[0], f, h, w, p, q, r, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(x.shape[0], c, f * p, h * q, w * r)

    # --- official bidirectional forward ---------------------------------------------------------
    def forward_full(
        self,
        x: list[torch.Tensor],
        t: torch.Tensor,
        context: list[torch.Tensor],
        seq_len: int | None = None,
    ) -> list[torch.Tensor]:
        """Official `WanModel.forward`: clips x[b] [C, F, H, W], timesteps t [B], contexts [T_b, text_dim].

        Clips are zero-padded to `seq_len` tokens; padded tokens are masked as keys and dropped.
        """
        tokens, grids = zip(*(self.patchify(u[None]) for u in x))
        lens = [u.shape[1] for u in tokens]
        seq_len = seq_len or max(lens)
        if max(lens) > seq_len:
            raise ValueError(f"clip of {max(lens)} tokens exceeds seq_len={seq_len}")
        h = torch.cat([torch.nn.functional.pad(u, (0, 0, 0, seq_len - u.shape[1])) for u in tokens])
        B, device = h.shape[0], h.device
        e, e0 = self.embed_time(t.reshape(B, 1))
        ctx = torch.cat([self.embed_text(c[None]) for c in context])
        # RoPE per clip on its own grid; padded tokens keep angle 0 (identity), as the reference.
        half = self.config.head_dim // 2
        cos = torch.ones(B, seq_len, 1, half, device=device)
        sin = torch.zeros(B, seq_len, 1, half, device=device)
        for b, (f, hh, ww) in enumerate(grids):
            cb, sb = self.rope.freqs(torch.zeros(1, dtype=torch.long, device=device), f, hh, ww)
            cos[b, : lens[b]], sin[b, : lens[b]] = cb[0], sb[0]
        key_mask = None
        if min(lens) < seq_len:
            key_mask = (torch.arange(seq_len, device=device) < torch.tensor(lens, device=device)[:, None])[
                :, None, None, :
            ]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)

        for block in self.blocks:
            ck, cv = block.cross_attn.kv(ctx)
            h = block(h, e0, attend, ck, cv)
        out = self.head(h, e)
        return [self.unpatchify(out[b : b + 1], grids[b])[0] for b in range(B)]

    # --- StreamDiffusionV2 causal streaming forward -----------------------------------------------
    def forward_stream(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross: CrossKV,
        cache: KVCache,
        plan: CallPlan,
        extension: StreamExtension | None = None,
    ) -> torch.Tensor:
        """One chunk per lane: x [B, F, C, h, w] noisy latents, t [B, F] timesteps → flow, same shape.

        Keys and values of the chunk are written into `cache` (as `plan` says) before attention; the
        chunk attends itself bidirectionally and everything cached, with no mask. An `extension`
        (e.g. VACE) may add to the hidden state after any block.
        """
        tokens, grid = self.patchify(x.transpose(1, 2))
        e, e0 = self.embed_time(t, extension.time_sinusoid if extension is not None else sinusoid)
        if extension is not None:
            extension.begin(self, tokens, e0, grid)
        cos, sin = self.rope.freqs(plan.rope_start, *grid)
        first_half, second_half = self._halves
        h = tokens
        for layer, block in enumerate(self.blocks):
            q, k, v = first_half(block, h, e0, cos, sin)
            # The chunk's keys/values go into the cache before attention; the chunk attends the cache.
            k_all, v_all = cache.update(layer, k, v, plan)
            y = attention(q.transpose(1, 2), k_all, v_all, plan.mask)
            h = second_half(block, h, y, e0, cross.k[layer], cross.v[layer])
            if extension is not None:
                h = extension.after_block(layer, h)
        out = self.head(h, e)
        return self.unpatchify(out, grid).transpose(1, 2)

    # --- speed ---------------------------------------------------------------------------------------
    _halves: tuple[Callable[..., Any], Callable[..., Any]]

    def optimize(self, *, compile: bool = True, fuse_qkv: bool = True) -> WanDiT:
        """Fuse q/k/v GEMMs and compile the two halves of a block once, reused by every layer (regional
        compilation: one compile instead of thirty). The KV-cache update and attention stay outside the
        compiled regions: they are already few large kernels, and the whole step is CUDA-graphed anyway.

        One compiled graph serves every lane count from 2 up (the lane dim is marked dynamic: a live steps
        change compiles nothing; `fastpath.LANES_MAX`). The halves write nothing but their outputs, so a new
        shape mid-stream (a frame size, 1 lane) compiles on a helper thread while the stream runs the eager
        halves (`fastpath.COMPILES`)."""
        if fuse_qkv:
            for block in self.blocks:
                block.self_attn.fuse_qkv()
        if compile:  # a failed compile falls back to the eager halves (counted in fastpath.FALLBACKS)
            self._halves = (
                CompiledOrEager(
                    torch.compile(_first_half, dynamic=None),
                    _first_half,
                    "DiT block, first half",
                    background=True,
                    lane_args=(1, 2, 3, 4),  # x, e0, cos, sin
                ),
                CompiledOrEager(
                    torch.compile(_second_half, dynamic=None),
                    _second_half,
                    "DiT block, second half",
                    background=True,
                    lane_args=(1, 2, 3),  # x, y, e0 (the text K/V are one prompt's, for every lane)
                ),
            )
        return self


def _first_half(
    block: WanBlock, x: torch.Tensor, e0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = block.attention_inputs(x, e0)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _second_half(
    block: WanBlock, x: torch.Tensor, y: torch.Tensor, e0: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor
) -> torch.Tensor:
    return block.attention_outputs(x, y, e0, ck, cv)


WanDiT._halves = (_first_half, _second_half)
