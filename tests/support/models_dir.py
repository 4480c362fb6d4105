"""Write a complete models folder of tiny, mutually consistent checkpoints in the official layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanstream.engine.random_weights import demo_components


def write_tiny_models_dir(
    root: Path, *, text_encoder: str = "bf16", taehv: bool = True, vace: bool = False
) -> Path:
    """The `wanstream download` layout (<root>/<repo>/<path>), filled from the demo networks."""
    c = demo_components()
    cfg = c.dit.config
    wan = root / "Wan2.1-T2V-1.3B"
    (root / "StreamDiffusionV2" / "wan_causal_dmd_v2v").mkdir(parents=True)
    wan.mkdir(parents=True)
    # StreamDiffusionV2's model.pt: {"generator": {"model.<wan key>": tensor}}.
    torch.save(
        {"generator": {f"model.{k}": v for k, v in c.dit.state_dict().items()}},
        root / "StreamDiffusionV2" / "wan_causal_dmd_v2v" / "model.pt",
    )
    # diffusers' config.json omits text_dim; ours is non-default (tiny), so it is written here.
    config = {
        "_class_name": "WanModel",
        "dim": cfg.dim,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "model_type": "t2v",
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
    }
    (wan / "config.json").write_text(json.dumps(config))
    torch.save(c.wan_vae.state_dict(), wan / "Wan2.1_VAE.pth")
    t5 = c.text_encoder.model.state_dict()
    if text_encoder == "bf16":
        torch.save({k: v.to(torch.bfloat16) for k, v in t5.items()}, wan / "models_t5_umt5-xxl-enc-bf16.pth")
    else:
        (root / "WanVideo_comfy").mkdir()
        save_file(
            {k: v.to(torch.float8_e4m3fn).contiguous() for k, v in t5.items()},
            str(root / "WanVideo_comfy" / "umt5-xxl-enc-fp8_e4m3fn.safetensors"),
        )
    c.text_encoder.tokenizer.tokenizer.save_pretrained(wan / "google" / "umt5-xxl")
    if taehv:
        (root / "Autoencoders").mkdir()
        torch.save(c.taehv.state_dict(), root / "Autoencoders" / "taew2_1.pth")
    if vace:  # Kijai's VACE-only file: every key vace_blocks.* or vace_patch_embedding.*, bf16
        (root / "WanVideo_comfy").mkdir(exist_ok=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in c.vace.state_dict().items()},
            str(root / "WanVideo_comfy" / "Wan2_1-VACE_module_1_3B_bf16.safetensors"),
        )
    return root
