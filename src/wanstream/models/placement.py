"""Where the umT5 text encoder lives and how the DiT stores its weights: the memory choices of a pipeline.

* text encoder "gpu": on the device in the compute dtype (11.4 GB for umT5-XXL in bf16);
* "fp8": on the device, its matrices and token table in float8 with per-row scales (≈ 5.7 GB; weight-only);
* "host": parked in pinned host memory, streamed to the device block by block for each new prompt
  (`models.offload`): ≈ 0.8 GB of the device for the time of an encode, nothing in between.

DiT precision "bf16" (as loaded) or "fp8" (the blocks' linear weights in float8, `fp8.dit_to_fp8_`): half
the DiT's weight memory everywhere, and on a GPU with float8 GEMMs (compute capability ≥ 8.9) the layers
measured faster in float8 also compute in float8 (`fp8.FLOAT8_COMPUTE_LAYERS`). The text encoder's "fp8"
saves memory only: its arithmetic stays bf16.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from wanstream.models.fp8 import (
    compute_shapes,
    dit_to_fp8_,
    float8_gemms,
    quantize_embedding_,
    quantize_linears_,
)
from wanstream.models.offload import HostTextEncoder
from wanstream.models.text import PromptTokenizer, TextEncoder, UMT5Encoder

TextPlacement = Literal["gpu", "host", "fp8"]
Precision = Literal["bf16", "fp8"]
TEXT_PLACEMENTS: tuple[str, ...] = ("auto", *get_args(TextPlacement))  # auto: host on a GPU
PRECISIONS: tuple[str, ...] = get_args(Precision)
PLACEMENT_WORDS = {
    "gpu": "on the device",
    "fp8": "on the GPU, float8 weights",
    "host": "in pinned host memory, moved in per new prompt",
}


def resolve_text_placement(placement: str, device: torch.device) -> TextPlacement:
    """ "auto": "host" on a GPU (the whole 480x832 pipeline then fits a 24 GB card; a prompt change costs
    the encoder's copy, ≈ 0.23 s for umT5-XXL on an H100), "gpu" on the CPU (the host is the device)."""
    if placement not in TEXT_PLACEMENTS:
        raise ValueError(f"text encoder placement {placement!r}: use one of {', '.join(TEXT_PLACEMENTS)}")
    if placement == "auto":
        return "host" if device.type == "cuda" else "gpu"
    if placement == "host" and device.type != "cuda":
        return "gpu"  # nothing to park: the encoder already runs from host memory
    return placement  # type: ignore[return-value]


def check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision  # type: ignore[return-value]


def apply_precision_(dit: nn.Module, precision: str, device: torch.device) -> None:
    """The DiT (already on `device`) in `precision`: "fp8" converts its blocks' linear layers, computing in
    float8 where `device` has float8 GEMMs (`fp8.float8_gemms`: probed once, a warning where it fails)."""
    if check_precision(precision) == "fp8":
        dit_to_fp8_(dit, float8_compute=float8_gemms(device, compute_shapes(dit)))


def place_text_encoder(
    model: UMT5Encoder, tokenizer: PromptTokenizer, placement: TextPlacement, device: torch.device
) -> TextEncoder:
    """`model` (in host memory, compute dtype) placed as asked. "fp8" converts one block at a time on the
    device, so the device never holds more than the float8 encoder plus one full-width block (or table)."""
    if placement == "host":
        return HostTextEncoder(model, tokenizer, device)
    if placement == "gpu":
        return TextEncoder(model.to(device), tokenizer)
    for block in model.blocks:
        quantize_linears_(block.to(device))
    quantize_embedding_(model.token_embedding.to(device))
    return TextEncoder(model.to(device), tokenizer)
