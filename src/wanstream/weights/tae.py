"""Load TAEHV from `taew2_1.pth` (madebyollin/taehv; a flat state dict) or its `.safetensors` copy.

Strict, with one deliberate exception the reference also makes: when the model's TGrow layers grow time
less than the checkpoint's (a cheaper preview decoder built with `decoder_time_upscale` False), the
checkpoint's TGrow conv has `stride`× more output channels, i.e. one block of channels per output frame
in time order. We keep the *last* block: the latest frame of each group, the one the next frames' memory
continues from, so a preview without time upsampling still shows the newest moment of every latent.
"""

from __future__ import annotations

import torch

from wanstream.models.tae import TAEHV, TAEHVConfig, TGrow
from wanstream.weights.loaders import (
    CheckpointSource,
    StateDict,
    build_on_meta,
    load_into,
    read_state_dict,
)


def load_taehv(
    checkpoint: CheckpointSource,
    config: TAEHVConfig | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    source: str | None = None,
) -> TAEHV:
    """Build `TAEHV(config)` (default: the real taew2_1) and strictly load `checkpoint` into it.

    float16 is the default: StreamDiffusionV2 and the upstream example both run TAEHV in float16.
    """
    name, sd = read_state_dict(checkpoint, source)
    config = config or infer_config(sd)
    model = build_on_meta(lambda: TAEHV(config))
    sd = trim_tgrow_weights(model, sd)
    return load_into(model, sd, name, dtype=dtype, device=device).eval().requires_grad_(False)


def trim_tgrow_weights(model: TAEHV, sd: StateDict) -> StateDict:
    """Keep the last out-channel block of TGrow weights made for more frames than `model`'s (a new dict)."""
    sd = dict(sd)
    expected = model.state_dict()
    for index, layer in enumerate(model.decoder):
        key = f"decoder.{index}.conv.weight"
        if not isinstance(layer, TGrow) or key not in sd:
            continue  # a missing key is reported by the strict check
        have, want = tuple(sd[key].shape), tuple(expected[key].shape)
        if have[0] > want[0] and have[0] % want[0] == 0 and have[1:] == want[1:]:
            sd[key] = sd[key][-want[0] :]
        # Anything else that differs is reported with every other mismatch by the strict check.
    return sd


def infer_config(sd: StateDict) -> TAEHVConfig:
    """taew2_1's layout with the channel widths read off the weights (the real file gives the real
    widths); anything else that does not fit is reported by the strict load."""
    try:
        encoder = int(sd["encoder.0.weight"].shape[0])
        memblock = sorted(
            (int(k.split(".")[1]), int(v.shape[0]))
            for k, v in sd.items()
            if k.startswith("decoder.") and k.endswith(".conv.0.weight")
        )
        widths = list(dict.fromkeys(w for _, w in memblock))
        last = max(int(k.split(".")[1]) for k in sd if k.startswith("decoder."))
        widths.append(int(sd[f"decoder.{last}.weight"].shape[1]))
    except (KeyError, ValueError, IndexError):
        return TAEHVConfig()
    if len(widths) != 4:
        return TAEHVConfig()
    return TAEHVConfig(encoder_width=encoder, decoder_widths=tuple(widths))  # type: ignore[arg-type]
