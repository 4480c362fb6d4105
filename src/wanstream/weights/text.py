"""Load the umT5-XXL text encoder and its tokenizer from the official files.

Accepted encoder checkpoints (Wan key layout, `token_embedding.weight`, `blocks.{i}.…`, `norm.weight`):

* `models_t5_umt5-xxl-enc-bf16.pth` — Wan2.1's plain bfloat16 state dict (torch pickle, 11.4 GB);
* `umt5-xxl-enc-fp8_e4m3fn.safetensors` — the ComfyUI repack (Kijai/WanVideo_comfy, ≈6.7 GB): the
  same names with float8 weights. A `spiece_model` entry (ComfyUI's embedded tokenizer) is ignored;
* a state dict already in memory.

`dtype` is the compute (activation) dtype. `weight_dtype` chooses how the matrices (linear layers and
the token table) are stored: `None` upcasts everything to `dtype` once at load; a float8 dtype keeps
them in float8 (bit-exact from an fp8 file; a wider file is range-checked and rounded) and each layer
upcasts its weight per call. Norms and relative-bias tables are always held in `dtype`.

The tokenizer is the `google/umt5-xxl` folder of the Wan2.1 download (`tokenizer.json` and/or
`spiece.model`, `tokenizer_config.json`, `special_tokens_map.json`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from wanstream.models.text import PromptTokenizer, TextEncoder, UMT5Config, UMT5Encoder
from wanstream.weights.loaders import (
    CheckpointError,
    CheckpointSource,
    StateDict,
    build_on_meta,
    check_keys,
    load_into,
    read_state_dict,
)

# Non-weight entries some repacks carry next to the weights.
_IGNORED_KEYS = ("spiece_model",)
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def load_umt5(
    checkpoint: CheckpointSource,
    config: UMT5Config | Mapping | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    source: str | None = None,
    weight_dtype: torch.dtype | None = None,
) -> UMT5Encoder:
    """Build a `UMT5Encoder` and strictly load `checkpoint` into it (inference mode, no grads).

    `config` defaults to the shapes found in the checkpoint (umT5-XXL for the official files).
    """
    if weight_dtype is not None and weight_dtype not in (*_FLOAT8, dtype):
        raise ValueError(f"weight_dtype must be None, {dtype} or a float8 dtype, got {weight_dtype}")
    name, sd = read_state_dict(checkpoint, source)
    sd = {k: v for k, v in sd.items() if k not in _IGNORED_KEYS}
    _reject_foreign_layouts(sd, name)

    if config is None:
        config = infer_config(sd, name)
    elif not isinstance(config, UMT5Config):
        config = UMT5Config.from_dict(dict(config))
    model = build_on_meta(lambda: UMT5Encoder(config)).to(dtype)
    if weight_dtype is not None:
        for module in _matrices(model):
            module.to(weight_dtype)
    check_keys(model, sd, name)

    targets = {k: p.dtype for k, p in model.state_dict().items()}
    converted = {k: _convert(v, targets[k], device, name, k) for k, v in sd.items()}
    return load_into(model, converted, name, device=device).eval().requires_grad_(False)


def infer_config(sd: StateDict, source: str) -> UMT5Config:
    """The encoder's shapes as stored in a Wan-layout state dict."""
    try:
        vocab, dim = sd["token_embedding.weight"].shape
        dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
        num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{source}: not a umT5 encoder checkpoint in the Wan layout "
            f"(expected token_embedding.weight, blocks.{{i}}.attn.q.weight, …; problem: {exc})"
        ) from None
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    try:
        return UMT5Config(
            vocab=vocab,
            dim=dim,
            dim_attn=dim_attn,
            dim_ffn=dim_ffn,
            num_heads=num_heads,
            num_layers=max(layers) + 1,
            num_buckets=num_buckets,
        )
    except ValueError as exc:
        raise CheckpointError(f"{source}: inconsistent umT5 shapes: {exc}") from None


def load_tokenizer(folder: str | Path, text_len: int = 512) -> PromptTokenizer:
    """The prompt tokenizer from a local `google/umt5-xxl` folder (never downloads)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(
            f"{folder}: tokenizer folder not found (it is google/umt5-xxl inside the Wan2.1-T2V-1.3B "
            "download; run `wanstream download`)"
        )
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: expected the google/umt5-xxl tokenizer folder, found a file")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        hint = ""
        if (folder / "google" / "umt5-xxl").is_dir():
            hint = f"; did you mean {folder / 'google' / 'umt5-xxl'}?"
        raise FileNotFoundError(
            f"{folder}: no tokenizer files (expected {' or '.join(_TOKENIZER_FILES)} with "
            f"tokenizer_config.json){hint}"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(
            f"{folder}: no fast tokenizer could be built from these files (need tokenizer.json)"
        )
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise CheckpointError(f"{folder}: not a T5 tokenizer (it defines no <pad> or </s> token)")
    return PromptTokenizer(tokenizer, text_len)


def load_text_encoder(
    checkpoint: CheckpointSource,
    tokenizer_folder: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    weight_dtype: torch.dtype | None = None,
    text_len: int = 512,
) -> TextEncoder:
    """Encoder checkpoint + tokenizer folder → a ready `TextEncoder`."""
    tokenizer = load_tokenizer(tokenizer_folder, text_len)
    model = load_umt5(checkpoint, dtype=dtype, device=device, weight_dtype=weight_dtype)
    return TextEncoder(model, tokenizer)


# ------------------------------------------------------------------------------------------------
def _matrices(model: UMT5Encoder) -> list[torch.nn.Module]:
    """The modules whose weights may be stored in float8: every linear layer and the token table."""
    return [model.token_embedding, *(m for m in model.modules() if isinstance(m, torch.nn.Linear))]


def _reject_foreign_layouts(sd: StateDict, source: str) -> None:
    if "shared.weight" in sd or any(k.startswith("encoder.block.") for k in sd):
        raise CheckpointError(
            f"{source}: this is a transformers UMT5EncoderModel checkpoint (shared.*, encoder.block.*); "
            "wanstream reads the Wan layout: models_t5_umt5-xxl-enc-bf16.pth or "
            "umt5-xxl-enc-fp8_e4m3fn.safetensors"
        )
    scaled = [k for k in sd if k.endswith(("scale_weight", "weight_scale", "scale_input"))]
    if scaled:
        raise CheckpointError(
            f"{source}: a scaled-fp8 checkpoint (e.g. {scaled[0]}) is not supported; use the plain "
            "umt5-xxl-enc-fp8_e4m3fn.safetensors or the bf16 .pth"
        )


def _convert(
    tensor: torch.Tensor, target: torch.dtype, device: torch.device | str, source: str, key: str
) -> torch.Tensor:
    """One tensor to its storage dtype on `device` (one tensor at a time: no second full copy)."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{source}: {key} holds {tensor.dtype} values; expected floating-point weights")
    if target in _FLOAT8 and tensor.dtype != target:
        # float8 has no inf and a small range: rounding a wider weight must not saturate silently.
        limit = torch.finfo(target).max
        peak = float(tensor.detach().abs().amax()) if tensor.numel() else 0.0
        if not peak <= limit:
            raise CheckpointError(
                f"{source}: {key} reaches {peak:.4g}, beyond {target}'s range ±{limit}; "
                "keep weight_dtype=None for this checkpoint"
            )
    return tensor.to(device=device, dtype=target)
