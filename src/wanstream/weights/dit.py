"""Load the Wan DiT from the official files.

Accepted: `diffusion_pytorch_model.safetensors` (diffusers dump of WanModel), the StreamDiffusionV2 /
CausVid / Self-Forcing `model.pt` (`{"generator": {"model.<key>": ...}}`, or `generator_ema`,
`state_dict`, a raw dict; `model.` / `_fsdp_wrapped_module.` prefixes stripped), or a state dict
already in memory. The architecture comes from the Wan `config.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from wanstream.models.dit import WanConfig, WanDiT
from wanstream.weights.loaders import build_on_meta, load_into, read_checkpoint, unwrap_generator

CheckpointSource = str | Path | Mapping[str, torch.Tensor]


def load_dit(
    checkpoint: CheckpointSource,
    config: WanConfig | str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    source: str | None = None,
) -> WanDiT:
    """Build a `WanDiT` from `config` (a WanConfig or a config.json path) and strictly load `checkpoint`."""
    if not isinstance(config, WanConfig):
        config = WanConfig.from_json(config)
    if isinstance(checkpoint, Mapping):
        name = source or "<state dict>"
        sd = unwrap_generator(checkpoint, name)
    else:
        name = source or str(checkpoint)
        sd = unwrap_generator(read_checkpoint(checkpoint), name)
    model = build_on_meta(lambda: WanDiT(config))
    return load_into(model, sd, name, dtype=dtype, device=device).eval().requires_grad_(False)
