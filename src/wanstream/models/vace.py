"""VACE: control video, masks and reference images steering the Wan DiT through additive hints.

The module holds the VACE half of a VACE checkpoint in its official key layout (Kijai's
`Wan2_1-VACE_module_1_3B_bf16.safetensors`, the same names as the `vace_*` keys of the Wan2.1-VACE
models): `vace_patch_embedding` (Conv3d 96 → dim, patch (1, 2, 2)) and `vace_blocks.<n>`, one ordinary
Wan block per VACE layer plus `after_proj` (dim → dim) and, on block 0 only, `before_proj`.

How the hints are made, once per DiT call (`VaceModule.hints`):
  1. the 96-channel context [96, F_ctx, h, w] (32 latent channels of the inactive / reactive video,
     64 mask channels) is patch-embedded to tokens and fitted to the length of the chunk's tokens;
  2. `c = before_proj(c) + x`, x being the patch-embedded noisy chunk before any DiT block;
  3. each VACE block runs on c with the chunk's time modulation and text, and hint n = after_proj(c).
Main layer `vace_layers[n]` adds `hint[n] · scale` after its block (`VaceExtension.after_block`).

Daydream Scope's CausalVaceWanModel is reproduced exactly by default, including its quirks; each is
marked QUIRK where it happens:
  * zero-padded keys are attended (not masked) in the VACE blocks' self-attention;
  * contexts longer than the chunk are truncated, shorter ones zero-filled;
  * the time sinusoid is float32 whenever VACE is enabled (the plain DiT's is float64), also in calls
    without a context and in the t = 0 cache pass;
  * the t = 0 cache pass runs without hints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wanstream.models.attention import attention
from wanstream.models.dit import CrossKV, StreamExtension, WanBlock, WanConfig, WanDiT, sinusoid

VACE_IN_DIM = 96  # 16 inactive + 16 reactive latent channels + 64 mask channels (8×8 pixels per latent)
PAD_MULTIPLE = 128  # Scope's flex-attention pads q/k/v to a multiple of this many tokens


def default_vace_layers(num_layers: int) -> tuple[int, ...]:
    """Every second layer, from 0: 15 VACE blocks for the 30-layer 1.3B DiT."""
    return tuple(range(0, num_layers, 2))


def vace_sinusoid(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos | sin] of raw timesteps in float32: exp(−ln(10000)·k/half), as Scope's VACE forward builds it."""
    half = freq_dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000) * k / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class VaceBlock(WanBlock):
    """A Wan block over the VACE stream, with the projection that turns its output into a hint."""

    def __init__(self, cfg: WanConfig, first: bool) -> None:
        super().__init__(cfg)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)


class VaceModule(nn.Module):
    """The VACE blocks and context patch embedding for one Wan DiT architecture (no DiT weights)."""

    def __init__(
        self, config: WanConfig, vace_layers: Sequence[int] | None = None, in_dim: int = VACE_IN_DIM
    ) -> None:
        super().__init__()
        layers = tuple(vace_layers) if vace_layers is not None else default_vace_layers(config.num_layers)
        if not layers or layers[0] != 0 or list(layers) != sorted(set(layers)):
            raise ValueError(f"vace_layers must be increasing and start at 0, got {list(layers)}")
        if layers[-1] >= config.num_layers:
            raise ValueError(f"vace_layers {list(layers)} exceed the DiT's {config.num_layers} layers")
        self.config = config
        self.vace_layers = layers
        self.in_dim = in_dim
        self.hint_of_layer = {layer: n for n, layer in enumerate(layers)}
        self.vace_blocks = nn.ModuleList([VaceBlock(config, first=n == 0) for n in range(len(layers))])
        self.vace_patch_embedding = nn.Conv3d(
            in_dim, config.dim, kernel_size=config.patch_size, stride=config.patch_size
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.vace_patch_embedding.weight.dtype

    def text_kv(self, dit: WanDiT, embeddings: torch.Tensor) -> CrossKV:
        """Cross-attention K/V of every VACE block for one conditioning [1, T, text_dim] (once per prompt).

        The text is embedded by the DiT (shared with the main blocks); each VACE block projects it."""
        ctx = dit.embed_text(embeddings)
        kv = CrossKV()
        for block in self.vace_blocks:
            k, v = block.cross_attn.kv(ctx)
            kv.k.append(k)
            kv.v.append(v)
        return kv

    def embed_context(self, context: torch.Tensor, length: int) -> torch.Tensor:
        """Context [96, F_ctx, h, w] → tokens [1, length, dim] in (f, h, w) order.

        QUIRK (Scope): the tokens are cut or zero-filled to the chunk's token count, so a context with
        more frames than the chunk (reference images prepended) loses its trailing frames, and a shorter
        one leaves the chunk's last frames with zero tokens (their hint input is before_proj.bias + x).
        """
        c = self.vace_patch_embedding(context[None].to(self.dtype)).flatten(2).transpose(1, 2)
        if c.shape[1] >= length:
            return c[:, :length]
        return F.pad(c, (0, 0, 0, length - c.shape[1]))

    def hints(
        self,
        dit: WanDiT,
        context: torch.Tensor,
        tokens: torch.Tensor,
        e0: torch.Tensor,
        grid: tuple[int, int, int],
        text: CrossKV,
        *,
        pad_keys: bool = True,
        trace: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """One hint [B, S, dim] per VACE block for the chunk tokens x [B, S, dim] and its modulation e0.

        The VACE blocks attend only the chunk itself (no KV cache), with RoPE frames counted from 0
        whatever the chunk's stream position. `pad_keys=False` is the corrected attention (see
        `VaceExtension`).
        """
        B, S, _ = tokens.shape
        c = self.embed_context(context, S).expand(B, -1, -1)
        if trace is not None:
            trace["vace_tokens"] = c
        cos, sin = dit.rope.freqs(torch.zeros(B, dtype=torch.long, device=tokens.device), *grid)
        first_half, second_half = dit._halves  # the DiT's (possibly compiled) block halves: same class
        # QUIRK (Scope): q/k/v are zero-padded to a multiple of 128 tokens and the padded keys are not
        # masked: each adds a logit of 0 (value 0) to the softmax, diluting the real attention weights.
        n_pad = (-S) % PAD_MULTIPLE if pad_keys else 0
        hints = []
        for n, block in enumerate(self.vace_blocks):
            if n == 0:
                c = block.before_proj(c) + tokens
            q, k, v = first_half(block, c, e0, cos, sin)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if n_pad:
                k, v = F.pad(k, (0, 0, 0, n_pad)), F.pad(v, (0, 0, 0, n_pad))
            y = attention(q.transpose(1, 2), k, v)
            c = second_half(block, c, y, e0, text.k[n], text.v[n])
            hints.append(block.after_proj(c))
        return hints


class VaceExtension(StreamExtension):
    """The DiT hooks for one chunk: hints from `context` at `scale` (context None: no hints this chunk).

    With `float32_sinusoid` (Scope's VACE forward, default) every call of a VACE-enabled stream uses the
    float32 time sinusoid, hints or not; False uses the DiT's float64 one (moves the output by ~2e-6
    rel-L2 on the golden case). `pad_keys=False` masks Scope's zero-padded keys out of the VACE
    attention (a correction: moves hints by 4–7e-2 and the output by 2e-2 rel-L2 where padding occurs,
    i.e. whenever the chunk's token count is not a multiple of 128, e.g. 480×832; none at 512×512).
    """

    def __init__(
        self,
        vace: VaceModule,
        context: torch.Tensor | None,
        text: CrossKV | None,
        scale: float = 1.0,
        *,
        float32_sinusoid: bool = True,
        pad_keys: bool = True,
        trace: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if context is not None:
            if context.dim() != 4 or context.shape[0] != vace.in_dim:
                raise ValueError(
                    f"VACE context must be [{vace.in_dim}, frames, h, w], got {tuple(context.shape)}"
                )
            if text is None:
                raise ValueError("a VACE context needs the VACE blocks' text K/V (VaceModule.text_kv)")
        self.vace = vace
        self.context = context
        self.text = text
        self.scale = float(scale)
        self.float32_sinusoid = float32_sinusoid
        self.pad_keys = pad_keys
        self.trace = trace
        self.hints: list[torch.Tensor] | None = None

    def time_sinusoid(self, freq_dim: int, t: torch.Tensor) -> torch.Tensor:
        # QUIRK (Scope): float32 whenever the VACE wrapper is loaded, with or without a context.
        return vace_sinusoid(freq_dim, t) if self.float32_sinusoid else sinusoid(freq_dim, t)

    def begin(self, dit: WanDiT, tokens: torch.Tensor, e0: torch.Tensor, grid: tuple[int, int, int]) -> None:
        self.hints = None
        if self.context is None:
            return
        ctx_h, ctx_w = self.context.shape[2:]
        p = dit.config.patch_size
        if (ctx_h // p[1], ctx_w // p[2]) != grid[1:]:
            raise ValueError(
                f"VACE context latents are {ctx_h}x{ctx_w}, the chunk's are {grid[1] * p[1]}x{grid[2] * p[2]}"
            )
        if self.trace is not None:
            self.trace["x_tokens"] = tokens
        assert self.text is not None
        self.hints = self.vace.hints(
            dit, self.context, tokens, e0, grid, self.text, pad_keys=self.pad_keys, trace=self.trace
        )

    def after_block(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        n = self.vace.hint_of_layer.get(layer)
        if n is None or self.hints is None:
            return h
        return h + self.hints[n] * self.scale

    def clean_pass(self) -> StreamExtension:
        # QUIRK (Scope): the t = 0 cache pass gets no vace_context, so cached keys/values carry no hints;
        # it still runs the VACE wrapper's forward, hence its float32 sinusoid.
        return VaceExtension(self.vace, None, None, float32_sinusoid=self.float32_sinusoid)
