"""Local files → the loaded networks of a pipeline (`LoadedNetworks`; `wanstream.pipeline` makes the engine's
`Components` of them). Never downloads.

Missing files raise `MissingWeightsError`, whose message lists them and gives the exact
`wanstream download ...` command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.placement import (
    PLACEMENT_WORDS,
    apply_precision_,
    check_precision,
    place_text_encoder,
    resolve_text_placement,
)
from wanstream.models.text import TextEncoder
from wanstream.weights.dit import load_dit
from wanstream.weights.store import Store, resolve_pipeline_files
from wanstream.weights.text import load_text_encoder
from wanstream.weights.vae import load_wan_vae

Progress = Callable[[str], None]


@dataclass
class LoadedNetworks:
    """The networks read from a models folder, on their device (the fields `Components` takes of them)."""

    dit: WanDiT
    wan_vae: torch.nn.Module
    taehv: torch.nn.Module | None
    text_encoder: TextEncoder
    vace: torch.nn.Module | None
    label: str
    precision: str
    text_placement: str
    files: dict[str, str]  # role → the file each network was read from (a session log's model identity)


def load_networks(
    models_dir: str | Path | None = None,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    text_encoder: str = "auto",
    text_encoder_file: str = "auto",
    precision: str = "bf16",
    taehv: bool = True,
    vace: bool | Literal["auto"] = False,
    model_size: str = "1.3b",
    progress: Progress | None = None,
) -> LoadedNetworks:
    """Load the StreamDiffusionV2 networks onto `device`.

    TAEHV is loaded when `taehv` and its file is present (it is optional); VACE when asked (`True`: its
    file must be there), or with `"auto"` when its file is present.
    `text_encoder` is where the umT5 lives ("auto" | "gpu" | "host" | "fp8", `models.placement`);
    `text_encoder_file` which downloaded file it is read from ("auto": bf16 if present, else fp8);
    `precision="fp8"` stores the DiT blocks' linear weights in float8 (computing in float8 where the GPU can:
    `models.placement.apply_precision_`).
    """
    placement = resolve_text_placement(text_encoder, device)
    check_precision(precision)
    say = progress or (lambda _msg: None)
    files = resolve_pipeline_files(
        models_dir=models_dir,
        model_size=model_size,
        text_encoder=text_encoder_file,  # type: ignore[arg-type]
        vace=vace is True,
    )
    say("Loading diffusion model…")
    config = WanConfig.from_json(files.config)
    dit = load_dit(files.generator, config, dtype=dtype, device=device)
    apply_precision_(dit, precision, device)
    say(f"Loading text encoder ({PLACEMENT_WORDS[placement]})…")
    # Read into host memory, then placed: parked there, or moved / converted block by block.
    host = load_text_encoder(
        files.text_encoder, files.tokenizer, dtype=dtype, device="cpu", text_len=config.text_len
    )
    text = place_text_encoder(host.model, host.tokenizer, placement, device)
    say("Loading VAE…")
    vae = load_wan_vae(files.vae, dtype=dtype, device=device)
    tae = None
    tae_path = None
    if taehv:
        store = Store(files.models_dir)
        status = next((store.status(a) for a in _artifacts_with_role("taehv")), None)
        if status is not None and status.present:
            from wanstream.weights.tae import load_taehv

            say("Loading TAEHV…")
            tae_path = status.path
            tae = load_taehv(
                status.path, dtype=torch.float16 if device.type == "cuda" else dtype, device=device
            )
    vace_module = None
    vace_path = files.vace
    if vace == "auto":
        status = next((Store(files.models_dir).status(a) for a in _artifacts_with_role("vace")), None)
        vace_path = status.path if status is not None and status.present else None
    if vace and vace_path is not None:
        from wanstream.weights.vace import load_vace

        say("Loading VACE…")
        vace_module = load_vace(vace_path, dit, dtype=dtype, device=device)
    return LoadedNetworks(
        dit=dit,
        wan_vae=vae,
        taehv=tae,
        text_encoder=text,
        vace=vace_module,
        label=f"StreamDiffusionV2 {model_size.upper()} ({files.models_dir})",
        precision=precision,
        text_placement=placement,
        files={
            role: str(path)
            for role, path in (
                ("dit", files.generator),
                ("config", files.config),
                ("vae", files.vae),
                ("text_encoder", files.text_encoder),
                ("taehv", tae_path),
                ("vace", vace_path if vace_module is not None else None),
            )
            if path is not None
        },
    )


def _artifacts_with_role(role: str) -> list:
    from wanstream.weights.registry import DEFAULT_PIPELINE, get_pipeline

    return [a for a in get_pipeline(DEFAULT_PIPELINE).artifacts if a.role == role]
