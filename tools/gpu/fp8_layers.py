"""Float8 GEMMs per DiT layer at the stream's shapes, and the whole DiT call in fp8 against bf16 (issue
"Performance II" item 3: "measured per layer, not assumed"; `models.fp8.FLOAT8_COMPUTE_LAYERS` is what it
chose from the issue's first measurement).

Per layer (fused q/k/v 1536→4608, self / cross-attention projections 1536→1536, FFN up 1536→8960 and down
8960→1536) at 1, 2 and 4 lanes × 1,560 tokens (480x832): milliseconds (CUDA events, median) of the bf16 GEMM,
of the float8 one, and of the float8-stored weight widened to bf16 per call (what the layers outside
`FLOAT8_COMPUTE_LAYERS` do), each compiled together with the op that feeds it in the block (a modulated LayerNorm;
for the FFN's down projection its GELU), so the activation's float8 quantisation is fused as it is in the
stream. Then a 2-step stream on the full-size random networks in bf16 and with `precision="fp8"` (float8
GEMMs as chosen): the rel-L2 of its frames against bf16's.

Usage (repo root, after `source tools/gpu/env.sh`):
    python3 tools/gpu/fp8_layers.py OUT.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from vae_profile import timed  # this folder's: the median of CUDA-event times

from wanstream.engine.settings import DEFAULT_STEPS, StreamSettings
from wanstream.models import fp8

DIM, FFN = 1536, 8960
LAYERS = {  # name: (in, out, what feeds it in the block)
    "self_attn.qkv (fused)": (DIM, 3 * DIM, "norm"),
    "self_attn.o": (DIM, DIM, "plain"),
    "cross_attn.q": (DIM, DIM, "norm"),
    "cross_attn.o": (DIM, DIM, "plain"),
    "ffn.0": (DIM, FFN, "norm"),
    "ffn.2": (FFN, DIM, "gelu"),
}


def feeder(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def norm(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],)).mul(1.1).add(shift).to(x.dtype)

    def gelu(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + shift, approximate="tanh")

    return {"norm": norm, "gelu": gelu, "plain": lambda x, shift: x + shift}[kind]


def one_layer(name: str, d_in: int, d_out: int, kind: str, device: torch.device) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(d_in + d_out)
    weight = torch.randn(d_out, d_in, device=device, generator=gen).mul_(d_in**-0.5).bfloat16()
    bias = torch.randn(d_out, device=device, generator=gen).bfloat16()
    values, scale = fp8.quantize_rows(weight)
    feed = feeder(kind)

    def bf16(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.linear(feed(x, shift), weight, bias)

    def float8(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return fp8.linear(feed(x, shift), values, bias, scale, float8_compute=True)

    def widened(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:  # float8 storage, bf16 arithmetic
        return fp8.linear(feed(x, shift), values, bias, scale)

    # One compile each for every lane count (the lanes dim marked dynamic below, as in the stream's DiT).
    compiled = {"bf16": torch.compile(bf16), "fp8": torch.compile(float8), "widened": torch.compile(widened)}
    rows = []
    for lanes in (1, 2, 4):
        x = torch.randn(lanes, 1560, d_in, device=device, generator=gen).bfloat16()
        torch._dynamo.mark_dynamic(x, 0)
        shift = torch.randn(d_in, device=device, generator=gen).bfloat16()
        row: dict[str, Any] = {"layer": name, "lanes": lanes, "in": d_in, "out": d_out}
        try:
            want = compiled["bf16"](x, shift).float()
            got = compiled["fp8"](x, shift).float()
            row["rel_l2"] = float((got - want).norm() / want.norm())
            for key, fn in compiled.items():
                row[f"{key}_ms"] = timed(partial(fn, x, shift), iters=50)
            row["speedup"] = row["bf16_ms"] / row["fp8_ms"]
        except Exception as exc:  # reported; the other shapes and layers still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def stream_frames(device: torch.device) -> dict[str, Any]:
    """A 2-step stream of 6 chunks at 480x832 on the full-size random networks (compiled, CUDA graphs), in
    bf16 and with precision fp8: the rel-L2 of fp8's frames against bf16's, and whether float8 GEMMs ran."""
    from wanstream.engine.session import StreamSession
    from wanstream.pipeline import Pipeline

    gen = torch.Generator(device).manual_seed(0)
    frames = torch.rand(4 * 6, 480, 832, 3, device=device, generator=gen)
    embeds = torch.randn(1, 512, 4096, device=device, generator=gen).bfloat16()
    outputs, float8 = {}, {}
    for precision in ("bf16", "fp8"):
        pipeline = Pipeline.random_weights(device, text_encoder=None, precision=precision)
        float8[precision] = fp8.computes_in_float8(pipeline.components.dit)
        settings = StreamSettings(height=480, width=832, steps=DEFAULT_STEPS)  # 2 steps
        session = StreamSession(pipeline.components, settings, output="float")
        session.set_prompt_embeddings(embeds)
        chunks = [session.push(frames[i : i + 4]) for i in range(0, len(frames), 4)]
        outputs[precision] = torch.cat([c for c in chunks if len(c)]).float()
        del pipeline, session
        torch.cuda.empty_cache()
    a, b = outputs["fp8"], outputs["bf16"]
    return {"float8_gemms": float8, "frames": len(b), "rel_l2_fp8_vs_bf16": float((a - b).norm() / b.norm())}


@torch.inference_mode()
def main() -> None:
    device = torch.device("cuda")
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "float8_gemms": fp8.float8_gemms(device),
        "layers": [row for name, spec in LAYERS.items() for row in one_layer(name, *spec, device)],
    }
    with open(sys.argv[1], "w") as f:
        json.dump(summary, f, indent=1)
    try:
        summary["stream"] = stream_frames(device)
    except Exception as exc:
        summary["stream"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(json.dumps(summary.get("stream")), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
