"""Load the Wan2.1 VAE from the official files.

Accepted: `Wan2.1_VAE.pth` (a plain fp32 state dict of Wan's `WanVAE_`), a `.safetensors` copy of it, or a
state dict already in memory. The architecture comes from a `WanVAEConfig` (default: the released model).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from wanstream.models.vae import WanVAE, WanVAEConfig
from wanstream.weights.loaders import CheckpointSource, build_on_meta, load_into, read_state_dict


def load_wan_vae(
    checkpoint: CheckpointSource,
    config: WanVAEConfig | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    source: str | None = None,
) -> WanVAE:
    """Build a `WanVAE` from `config` on the meta device and strictly load `checkpoint` into it.

    Raises `CheckpointError` naming the file (or `source`) and the offending keys when the checkpoint is
    unreadable, not a state dict, or does not fit the config exactly.
    """
    name, sd = read_state_dict(checkpoint, source)
    config = config or infer_config(sd)
    model = build_on_meta(lambda: WanVAE(config))
    return load_into(model, sd, name, dtype=dtype, device=device).eval().requires_grad_(False)


def infer_config(sd: Mapping[str, torch.Tensor]) -> WanVAEConfig:
    """The real config, with base width and residual blocks read off the weights when they differ
    (small test checkpoints); anything else that does not fit is reported by the strict load."""
    default = WanVAEConfig()
    try:
        dim = int(sd["encoder.conv1.weight"].shape[0])
        stages = len(default.dim_mult)
        entries = len({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
        blocks, extra = divmod(entries - (stages - 1), stages)
    except (KeyError, ValueError, IndexError):
        return default
    if extra or blocks < 1:
        return default
    return WanVAEConfig(dim=dim, num_res_blocks=blocks)
