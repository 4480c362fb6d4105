"""Where a steady chunk's time goes on the GPU, by kernel class (issue "Performance II": the per-part times of
encode / DiT — GEMM, attention, other — / decode; issue 16 item 5: which part can give the 3x at 4 steps).

Full-size random networks, 480x832, stream batch, Wan VAE both ways, optimised as `serve` runs them, at 1-4
steps. For each step count: the chunk time with CUDA graphs (median of 10, as `bench` counts it), then one
profiled run of 3 chunks without CUDA graphs (the profiler then sees every kernel; the compiled code is the
same) with the time of every kernel in classes: GEMM (cuBLAS / CUTLASS / nvjet), attention (SDPA kernels),
convolution (the VAE's cuDNN convs), Triton (Inductor's fused kernels: norms, modulation, RoPE, the VAE's norm
+ SiLU), copies and the rest; the top 15 kernels; and the per-phase split (encode / DiT / decode by CUDA
events). Usage (repo root, after `source tools/gpu/env.sh`):
    python3 tools/gpu/chunk_profile.py OUT.json [STEPS ...]
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from wanstream.bench.single import STEP_LISTS
from wanstream.engine.denoise.local import Denoiser
from wanstream.engine.random_weights import random_components
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.models.fastpath import COMPILES

H, W = 480, 832
CLASSES = (  # first match wins: (class, substrings of the kernel's name)
    # Inductor names a fused kernel after every op in it ("triton_per_fused_..._convolution_..._silu")
    ("triton", ("triton",)),
    ("attention", ("fmha", "flash", "sdpa", "attn", "attention")),
    ("convolution", ("fprop", "dgrad", "conv", "implicit_convolve", "implicit_gemm")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("copy", ("copy", "memcpy", "memset", "cat", "index")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in CLASSES if any(k in low for k in keys)), "other")


def profile_chunks(session: StreamSession, frames: torch.Tensor, chunks: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(chunks):
            session.push(frames).cpu()
        torch.cuda.synchronize()
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if not total or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = total / 1000 / chunks  # microseconds → ms a chunk
        by_class[kernel_class(event.key)] += ms
        by_name[event.key] += ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "kernel_ms_per_chunk": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "kernel_ms_total": round(sum(by_class.values()), 2),
        "top_kernels": [[name[:140], round(ms, 3), kernel_class(name)] for name, ms in top],
    }


def chunk_ms(session: StreamSession, frames: torch.Tensor, n: int = 10) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        session.push(frames).cpu()
        times.append(1000 * (time.perf_counter() - t0))
    return round(sorted(times)[n // 2], 2)


@torch.inference_mode()
def main() -> None:
    out = Path(sys.argv[1])
    step_counts = [int(s) for s in sys.argv[2:]] or [1, 2, 3, 4]
    c = random_components(torch.device("cuda"), torch.bfloat16, text_encoder=None)
    c.optimize()
    gen = torch.Generator().manual_seed(0)
    cfg = c.dit.config
    prompt = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen) * 0.5).to("cuda", c.dtype)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    use_graphs = Denoiser.use_cuda_graphs
    for steps in step_counts:
        row: dict[str, Any] = {}
        for graphs in (True, False):
            Denoiser.use_cuda_graphs = (  # type: ignore[method-assign]
                lambda self, enabled=True, _g=graphs: use_graphs(self, enabled and _g)
            )
            session = StreamSession(c, StreamSettings(height=H, width=W, steps=STEP_LISTS[steps]))
            session.set_prompt_embeddings(prompt)
            for i in range(
                12
            ):  # compiles (the Wan VAE and new lane counts in the background), fills the window
                session.push(torch.randint(0, 256, (session.frames_needed, H, W, 3), dtype=torch.uint8)).cpu()
                if i == 4:
                    c.wan_vae.wait_compiled(timeout=600)
                    COMPILES.wait(timeout=600)
            frames = torch.randint(0, 256, (4, H, W, 3), dtype=torch.uint8)
            if graphs:
                row["chunk_ms_graphs"] = chunk_ms(session, frames)
            else:
                row["chunk_ms_no_graphs"] = chunk_ms(session, frames)
                row.update(profile_chunks(session, frames, chunks=3))
            del session
            torch.cuda.empty_cache()
        result["runs"][str(steps)] = row
        print(steps, json.dumps(row)[:600], flush=True)
        out.write_text(json.dumps(result, indent=1))
    Denoiser.use_cuda_graphs = use_graphs  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
