"""Per-DiT-call error of precision fp8 against bf16 on the full-size (1.3B) DiT with random weights, on the
CPU (issue "Performance II" item 3: "FP8 vs bf16 per-DiT-call rel-L2 on the full-size random network").

One bidirectional DiT call on a 2-latent-frame 16x32 clip (256 tokens) at three timesteps, in bf16, then with
the block layers in float8: weights only (`--storage-only`), or float8 GEMMs forced (the arithmetic a GPU of
compute capability >= 8.9 runs; torch's CPU `_scaled_mm` does the same: float8 inputs, float32 accumulation).
About 1-2 minutes and 5 GB of memory.

Usage (repo root): python tools/fp8_dit_error.py [--storage-only]
"""

from __future__ import annotations

import sys

import torch

from wanstream.engine.random_weights import randomize_
from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.fp8 import dit_to_fp8_

TIMESTEPS = (900.0, 500.0, 100.0)


@torch.inference_mode()
def main() -> None:
    float8_compute = "--storage-only" not in sys.argv
    config = WanConfig.t2v_1_3b()
    with torch.device("meta"):
        dit = WanDiT(config)
    dit = randomize_(dit.to_empty(device="cpu").to(torch.bfloat16), 1).eval()
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 2, 16, 32, generator=gen).bfloat16()]
    context = [torch.randn(64, config.text_dim, generator=gen).bfloat16()]
    bf16 = {t: dit.forward_full(x, torch.tensor([t]), context)[0].float() for t in TIMESTEPS}
    dit_to_fp8_(dit, float8_compute=float8_compute)
    dit.optimize(compile=False)  # q/k/v fused, as on the GPU path
    what = "float8 GEMMs" if float8_compute else "float8 weights, bf16 arithmetic"
    for t in TIMESTEPS:
        out = dit.forward_full(x, torch.tensor([t]), context)[0].float()
        err = float((out - bf16[t]).norm() / bf16[t].norm())
        print(f"t={t:.0f}: fp8 ({what}) vs bf16, rel-L2 of the DiT's output {err:.4f}", flush=True)


if __name__ == "__main__":
    main()
