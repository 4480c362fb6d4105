"""Load the VACE module (control video / masks / reference images) from the official files.

Accepted: the VACE-only file Scope uses, Kijai's `Wan2_1-VACE_module_1_3B_bf16.safetensors` (every key
`vace_blocks.*` or `vace_patch_embedding.*`), a full Wan2.1-VACE checkpoint (its DiT keys are skipped;
prefixes such as `model.diffusion_model.` before the VACE names are dropped), or a state dict in memory.
Loading is strict: every VACE tensor of the module must be in the file with its exact shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.vace import VACE_IN_DIM, VaceModule, default_vace_layers
from wanstream.weights.loaders import (
    CheckpointError,
    CheckpointSource,
    StateDict,
    build_on_meta,
    load_into,
    read_state_dict,
)

VACE_PREFIXES = ("vace_blocks.", "vace_patch_embedding.")
_VACE_KEY = re.compile(r"(?:^|\.)(vace_blocks\.|vace_patch_embedding\.)")
_BLOCK = re.compile(r"vace_blocks\.(\d+)\.")


def load_vace(
    checkpoint: CheckpointSource,
    dit: WanDiT | WanConfig,
    *,
    vace_layers: Sequence[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    source: str | None = None,
) -> VaceModule:
    """Build a `VaceModule` for `dit` (its config) and strictly load the VACE tensors of `checkpoint`.

    `vace_layers`: the DiT layers that receive hints; default every second layer from 0 (the 1.3B
    module's 15 blocks). Raises `CheckpointError` naming the file and the offending keys.
    """
    config = dit.config if isinstance(dit, WanDiT) else dit
    name, raw = read_state_dict(checkpoint, source)
    sd = vace_state(raw, name)
    layers = tuple(vace_layers) if vace_layers is not None else default_vace_layers(config.num_layers)
    check_vace_architecture(sd, config, layers, name)
    model = build_on_meta(lambda: VaceModule(config, layers))
    return load_into(model, sd, name, dtype=dtype, device=device).eval().requires_grad_(False)


def vace_state(sd: StateDict, source: str) -> StateDict:
    """The VACE tensors of a checkpoint, named as in the VACE-only file (anything before the name dropped)."""
    out: StateDict = {}
    for key, tensor in sd.items():
        m = _VACE_KEY.search(key)
        if m is not None:
            out[key[m.start(1) :]] = tensor
    if not out:
        shown = ", ".join(list(sd)[:3])
        raise CheckpointError(
            f"{source}: holds no VACE weights (no keys vace_blocks.* or vace_patch_embedding.*; found "
            f"e.g. {shown}). The VACE module is Kijai/WanVideo_comfy: Wan2_1-VACE_module_1_3B_bf16.safetensors"
        )
    return out


def check_vace_architecture(sd: StateDict, config: WanConfig, layers: tuple[int, ...], source: str) -> None:
    """Explain a VACE module made for another DiT (width, patch, input channels, block count)."""
    weight = sd.get("vace_patch_embedding.weight")
    if weight is not None:
        want = (config.dim, VACE_IN_DIM, *config.patch_size)
        if tuple(weight.shape) != want:
            dim, in_dim = (int(weight.shape[0]), int(weight.shape[1])) if weight.dim() >= 2 else (-1, -1)
            hint = (
                f"a VACE module for a DiT of width {dim}, this DiT has width {config.dim} "
                "(the 14B VACE module with the 1.3B DiT, or the other way round?)"
                if dim != config.dim
                else f"{in_dim} context channels, VACE contexts have {VACE_IN_DIM}"
                if in_dim != VACE_IN_DIM
                else f"patch {tuple(weight.shape[2:])}, the DiT's is {tuple(config.patch_size)}"
            )
            raise CheckpointError(
                f"{source}: vace_patch_embedding.weight is {tuple(weight.shape)}, expected {want}: {hint}"
            )
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    if blocks and len(blocks) != len(layers):
        raise CheckpointError(
            f"{source}: holds {len(blocks)} VACE blocks but {len(layers)} hint layers are configured "
            f"({list(layers)}); pass vace_layers with one DiT layer per VACE block"
        )
