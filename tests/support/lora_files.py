"""LoRA state dicts for tests, written in the naming schemes found in the wild.

The layer spellings here are written out by hand (not taken from the loader's own tables), so the tests
check the loader against the formats, not against itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from wanstream.engine.random_weights import randomize_
from wanstream.models.dit import WanConfig, WanDiT

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_len=8, text_dim=16, freq_dim=32)


def tiny_dit(dtype: torch.dtype = torch.float32, seed: int = 0) -> WanDiT:
    """A fresh two-block DiT with random weights (each test may change its weights freely)."""
    return randomize_(WanDiT(TINY), seed).to(dtype).eval().requires_grad_(False)


# Original Wan name → diffusers (WanTransformer3DModel) name, for the layers the tests use.
DIFFUSERS_NAMES = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.0.self_attn.v": "blocks.0.attn1.to_v",
    "blocks.1.self_attn.o": "blocks.1.attn1.to_out.0",
    "blocks.0.cross_attn.k": "blocks.0.attn2.to_k",
    "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
LAYERS = tuple(DIFFUSERS_NAMES)

# scheme → (key prefix, "wan"/"diffusers" names, flattened kohya-style?, (down, up) key parts)
SCHEMES = {
    "wan-comfy": ("diffusion_model.", "wan", False, ("lora_A", "lora_B")),
    "wan-bare": ("", "wan", False, ("lora_down", "lora_up")),
    "kohya": ("lora_unet_", "wan", True, ("lora_down", "lora_up")),
    "diffusers": ("transformer.", "diffusers", False, ("lora_A", "lora_B")),
    "peft": ("base_model.model.", "diffusers", False, ("lora_A", "lora_B")),
    "kohya-diffusers": ("lora_transformer_", "diffusers", True, ("lora_down", "lora_up")),
    "model-prefix": ("model.diffusion_model.", "wan", False, ("lora.down", "lora.up")),
}

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]  # layer → (down, up, alpha)


def random_pairs(
    shapes: dict[str, tuple[int, int]],
    layers: tuple[str, ...] | list[str],
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    strength: float = 0.5,
) -> Pairs:
    """Random adapters for `layers` (shapes: layer → (out, in)), big enough to change outputs visibly."""
    gen = torch.Generator().manual_seed(seed)
    pairs: Pairs = {}
    for layer in layers:
        out_f, in_f = shapes[layer]
        down = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        up = torch.randn(out_f, rank, generator=gen) * strength / rank**0.5
        pairs[layer] = (down, up, alpha)
    return pairs


def key_of(layer: str, scheme: str) -> str:
    prefix, names, flat, _ = SCHEMES[scheme]
    name = DIFFUSERS_NAMES[layer] if names == "diffusers" else layer
    return prefix + (name.replace(".", "_") if flat else name)


def lora_state_dict(pairs: Pairs, scheme: str) -> dict[str, torch.Tensor]:
    down_part, up_part = SCHEMES[scheme][3]
    out: dict[str, torch.Tensor] = {}
    for layer, (down, up, alpha) in pairs.items():
        key = key_of(layer, scheme)
        out[f"{key}.{down_part}.weight"] = down.contiguous()
        out[f"{key}.{up_part}.weight"] = up.contiguous()
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def write_lora(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """As .safetensors, or as a torch pickle for any other suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path
