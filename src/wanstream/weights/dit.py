"""Load the Wan DiT from the official files.

Accepted: `diffusion_pytorch_model.safetensors` (the Wan repos' dump of WanModel, also sharded with
its `.index.json`), the StreamDiffusionV2 / CausVid / Self-Forcing `model.pt`
(`{"generator": {"model.<key>": ...}}`, or `generator_ema`, `state_dict`, a raw dict; `model.` /
`_fsdp_wrapped_module.` prefixes stripped), a folder holding one of those (as StreamDiffusionV2's
`--checkpoint_folder`), or a state dict already in memory. The architecture comes from the Wan
`config.json` (`Wan2.1-T2V-1.3B/config.json`, or the 14B one for the 14B generator).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from wanstream.models.dit import WanConfig, WanDiT
from wanstream.weights.loaders import (
    FLOAT8_DTYPES,
    CheckpointError,
    CheckpointSource,
    StateDict,
    build_on_meta,
    load_into,
    read_checkpoint,
    unwrap_generator,
    upcast_per_call,
)

# What a checkpoint folder may hold, in the order they are looked for.
_FOLDER_FILES = (
    "model.pt",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_KNOWN_SIZES = {(1536, 30): "Wan2.1-T2V-1.3B", (5120, 40): "Wan2.1-T2V-14B"}


def load_dit(
    checkpoint: CheckpointSource,
    config: WanConfig | str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    source: str | None = None,
    weight_dtype: torch.dtype | None = None,
) -> WanDiT:
    """Build a `WanDiT` from `config` (a WanConfig or a config.json path) and strictly load `checkpoint`.

    `dtype` is the compute dtype. `weight_dtype=torch.float8_e4m3fn` stores the linear layers'
    weights in float8 (half the memory of bf16; bit-exact from a float8 file) and upcasts them per
    call; by default every weight is converted to `dtype` once, at load (float8 files included).
    """
    if weight_dtype is not None and weight_dtype not in (*FLOAT8_DTYPES, dtype):
        raise ValueError(f"weight_dtype must be None, {dtype} or a float8 dtype, got {weight_dtype}")
    if not isinstance(config, WanConfig):
        config = WanConfig.from_json(config)
    if isinstance(checkpoint, Mapping):
        name = source or "<state dict>"
        sd = unwrap_generator(checkpoint, name)
    else:
        path = checkpoint_file(checkpoint)
        name = source or str(path)
        sd = unwrap_generator(read_checkpoint(path), name)
    check_architecture(sd, config, name)
    model = build_on_meta(lambda: WanDiT(config))
    if weight_dtype is None or weight_dtype == dtype:
        model = load_into(model, sd, name, dtype=dtype, device=device)
    else:
        model.to(dtype)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):  # still on meta: this only sets the dtype to load into
                layer.weight = torch.nn.Parameter(layer.weight.to(weight_dtype), requires_grad=False)
        model = upcast_per_call(load_into(model, sd, name, device=device))
    return model.eval().requires_grad_(False)


def checkpoint_file(path: str | Path) -> Path:
    """`path` itself, or the generator / DiT checkpoint inside a folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    for candidate in _FOLDER_FILES:
        if (path / candidate).is_file():
            return path / candidate
    raise FileNotFoundError(
        f"{path}: no DiT checkpoint in this folder (looked for {', '.join(_FOLDER_FILES)}). "
        "The StreamDiffusionV2 generator is fetched with `wanstream download`."
    )


def describe_state(sd: StateDict) -> dict[str, int] | None:
    """The architecture a Wan DiT state dict implies (dim, layers, ffn, in/text dims), if it is one."""
    try:
        dim, in_dim = sd["patch_embedding.weight"].shape[:2]
        text_dim = sd["text_embedding.0.weight"].shape[1]
        ffn_dim = sd["blocks.0.ffn.0.weight"].shape[0]
    except (KeyError, IndexError, ValueError):
        return None
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    return {
        "dim": int(dim),
        "num_layers": max(layers) + 1 if layers else 0,
        "ffn_dim": int(ffn_dim),
        "in_dim": int(in_dim),
        "text_dim": int(text_dim),
    }


def check_architecture(sd: StateDict, config: WanConfig, source: str) -> None:
    """Explain a checkpoint made for another model size (e.g. the 14B generator with the 1.3B config)."""
    if any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in sd):
        raise CheckpointError(
            f"{source}: a diffusers-format WanTransformer3DModel checkpoint (condition_embedder.*, "
            "blocks.*.attn1.*); wanstream reads the original Wan layout: the Wan-AI/Wan2.1-T2V-* repos "
            "(not *-Diffusers) or the StreamDiffusionV2 model.pt"
        )
    found = describe_state(sd)
    if found is None:
        return  # not recognisably a DiT: the strict key check reports what is wrong
    wanted = {k: getattr(config, k) for k in found}
    if all(found[k] == wanted[k] for k in found if k != "num_layers"):
        return  # same widths: missing or extra blocks are reported key by key by the strict check
    diff = ", ".join(f"{k} {found[k]} (config {wanted[k]})" for k in found if found[k] != wanted[k])
    have = _KNOWN_SIZES.get((found["dim"], found["num_layers"]), "custom-size Wan")
    want = _KNOWN_SIZES.get((wanted["dim"], wanted["num_layers"]), "a custom size")
    raise CheckpointError(
        f"{source}: this checkpoint is a {have} DiT but the config describes {want}: {diff}. "
        "Use the config.json that belongs to this checkpoint (Wan2.1-T2V-14B/config.json for the "
        "14B generator, Wan2.1-T2V-1.3B/config.json for the 1.3B one)."
    )
