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
from dataclasses import dataclass
from typing import Any

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

    def optimize(self) -> VaceModule:
        """One fused q/k/v GEMM per VACE block, as `WanDiT.optimize` does for the DiT's (the VACE blocks run
        the DiT's own block halves, compiled there: nothing else to compile)."""
        for block in self.vace_blocks:
            block.self_attn.fuse_qkv()
        return self

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


@dataclass(frozen=True)
class VaceInputs:
    """Everything one VACE DiT call reads that may change from call to call, as device tensors.

    A captured DiT step reads static copies of these (refreshed before each replay), so a new control
    frame, a new prompt or a new scale of the same shapes replays the same graph. Nothing else about a
    call may vary without changing `VaceExtension.graph_key`.
    """

    context: torch.Tensor | None  # [96, F_ctx, h, w]; None: no hints this call
    scale: torch.Tensor | None  # float32 scalar on the context's device (None without a context)
    text: CrossKV | None  # the VACE blocks' text K/V (`VaceModule.text_kv`)

    def tensors(self) -> list[torch.Tensor]:
        if self.context is None:
            return []
        assert self.scale is not None and self.text is not None
        return [self.context, self.scale, *self.text.k, *self.text.v]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> VaceInputs:
        """The same inputs over other tensors (in `tensors()` order)."""
        if self.context is None:
            return self
        assert self.text is not None
        n = len(self.text.k)
        if len(tensors) != 2 + 2 * n:
            raise ValueError(f"VACE inputs: expected {2 + 2 * n} tensors, got {len(tensors)}")
        return VaceInputs(tensors[0], tensors[1], CrossKV(list(tensors[2 : 2 + n]), list(tensors[2 + n :])))


class VaceExtension(StreamExtension):
    """The DiT hooks for one chunk: hints from `context` at `scale` (context None: no hints this chunk).

    With `float32_sinusoid` (Scope's VACE forward, default) every call of a VACE-enabled stream uses the
    float32 time sinusoid, hints or not; False uses the DiT's float64 one (moves the output by ~2e-6
    rel-L2 on the golden case). `pad_keys=False` masks Scope's zero-padded keys out of the VACE
    attention (a correction: moves hints by 4–7e-2 and the output by 2e-2 rel-L2 where padding occurs,
    i.e. whenever the chunk's token count is not a multiple of 128, e.g. 480×832; none at 512×512).

    The call's data lives in `inputs` (tensors only; `scale` is kept as given for reports): the
    arithmetic reads nothing else, which is what lets a captured DiT step replay it (`graph_key`).
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
        inputs: VaceInputs | None = None,
    ) -> None:
        if context is not None:
            if context.dim() != 4 or context.shape[0] != vace.in_dim:
                raise ValueError(
                    f"VACE context must be [{vace.in_dim}, frames, h, w], got {tuple(context.shape)}"
                )
            if text is None:
                raise ValueError("a VACE context needs the VACE blocks' text K/V (VaceModule.text_kv)")
        self.vace = vace
        self.scale = float(scale)
        self.float32_sinusoid = float32_sinusoid
        self.pad_keys = pad_keys
        self.trace = trace
        if inputs is None:
            # A fill kernel, not a host→device copy: no synchronisation per chunk.
            scale_t = (
                None
                if context is None
                else torch.full((), self.scale, dtype=torch.float32, device=context.device)
            )
            inputs = VaceInputs(context, scale_t, text if context is not None else None)
        self.inputs = inputs
        self.hints: list[torch.Tensor] | None = None

    @property
    def context(self) -> torch.Tensor | None:
        return self.inputs.context

    @property
    def text(self) -> CrossKV | None:
        return self.inputs.text

    def time_sinusoid(self, freq_dim: int, t: torch.Tensor) -> torch.Tensor:
        # QUIRK (Scope): float32 whenever the VACE wrapper is loaded, with or without a context.
        return vace_sinusoid(freq_dim, t) if self.float32_sinusoid else sinusoid(freq_dim, t)

    def _check_grid(self, grid_hw: tuple[int, int], patch: tuple[int, int, int]) -> None:
        assert self.context is not None
        ctx_h, ctx_w = self.context.shape[2:]
        if (ctx_h // patch[1], ctx_w // patch[2]) != grid_hw:
            raise ValueError(
                f"VACE context latents are {ctx_h}x{ctx_w}, "
                f"the chunk's are {grid_hw[0] * patch[1]}x{grid_hw[1] * patch[2]}"
            )

    def begin(self, dit: WanDiT, tokens: torch.Tensor, e0: torch.Tensor, grid: tuple[int, int, int]) -> None:
        self.hints = None
        if self.context is None:
            return
        self._check_grid(grid[1:], dit.config.patch_size)
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
        assert self.inputs.scale is not None
        hint = self.hints[n]
        # The product in float32, rounded once to the hint's dtype: what `hint * python_float` computes, so
        # the scale can live in a device tensor (a graph replays a new scale without recapturing).
        return h + (hint.float() * self.inputs.scale).to(hint.dtype)

    def clean_pass(self) -> StreamExtension:
        # QUIRK (Scope): the t = 0 cache pass gets no vace_context, so cached keys/values carry no hints;
        # it still runs the VACE wrapper's forward, hence its float32 sinusoid.
        return VaceExtension(self.vace, None, None, float32_sinusoid=self.float32_sinusoid)

    # --- capture (see StreamExtension) -----------------------------------------------------------------
    def graph_key(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        if self.trace is not None:  # tracing keeps intermediate tensors: a replay would not refresh them
            return None
        if self.context is not None:
            patch = self.vace.config.patch_size
            self._check_grid((x.shape[-2] // patch[1], x.shape[-1] // patch[2]), patch)
        # The module itself (its weights are read in place), the numerics flags, and whether hints run;
        # the tensors' shapes (context frames: references present or not) are added by the graphs.
        return ("vace", self.vace, self.float32_sinusoid, self.pad_keys, self.context is not None)

    def graph_inputs(self) -> list[torch.Tensor]:
        return self.inputs.tensors()

    def reading(self, inputs: list[torch.Tensor]) -> VaceExtension:
        return VaceExtension(
            self.vace,
            None,
            None,
            math.nan,  # the scale is read from the inputs (a graph's static copy), never from here
            float32_sinusoid=self.float32_sinusoid,
            pad_keys=self.pad_keys,
            inputs=self.inputs.with_tensors(inputs),
        )
