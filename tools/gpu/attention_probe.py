"""The DiT's self-attention at the stream's shapes, on every kernel this stack can run (issue "Performance II"
item 2; issue 16 item 5 needs 6-22 ms a chunk).

Shapes: 12 heads of 128, one latent frame of queries per lane (1,560 tokens at 480x832) against the lane's KV
cache (6 frames when full: 9,360 tokens), 1, 2 and 4 lanes; bf16. For each kernel: milliseconds (CUDA events,
median of 20), TFLOP/s (4 * B * H * Sq * Sk * D), the relative L2 error against float32 math attention, and
whether it can be captured in a CUDA graph (the stream replays its DiT steps on graphs). Kernels: torch SDPA
with each backend forced (cuDNN, flash, memory-efficient), and FlashAttention 4 (CuTe DSL, `flash_attn.cute`:
SM90 kernels, JIT-compiled at first use — its compile time is reported) when importable.

Usage (repo root, after `source tools/gpu/env.sh`; FA4 installed by `matrix.sh FA2`):
    python3 tools/gpu/attention_probe.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from vae_profile import timed  # this folder's: the median of CUDA-event times

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # [B, H, S, D] in and out


def sdpa(backend: SDPBackend) -> Attn:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def fa4() -> Attn | None:
    try:
        from flash_attn.cute.interface import flash_attn_func
    except Exception as exc:  # not installed, or its stack does not load here: reported
        print(f"FlashAttention 4: not available ({type(exc).__name__}: {exc})", flush=True)
        return None

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return run


def capturable(fn: Callable[[], Any]) -> str:
    """'yes', or why a CUDA graph could not record it (or replayed other values)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        return "yes" if torch.equal(out, fn()) else "replays other values"
    except Exception as exc:
        return f"no: {type(exc).__name__}: {str(exc)[:200]}"


def measure(kernel: Attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, graph: bool) -> dict[str, Any]:
    """One kernel on one shape: its error against float32 math, its time and TFLOP/s, and (`graph`) whether
    a CUDA graph can hold it."""
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    row: dict[str, Any] = {"rel_l2": float((kernel(q, k, v).float() - exact).norm() / exact.norm())}
    del exact
    row["ms"] = timed(lambda: kernel(q, k, v), iters=20)
    B, H, Sq, D = q.shape
    row["tflops"] = 4 * B * H * Sq * k.shape[2] * D / (row["ms"] / 1000) / 1e12
    if graph:
        row["cuda_graph"] = capturable(lambda: kernel(q, k, v))
    return row


@torch.inference_mode()
def main() -> None:
    out_path = sys.argv[1]
    device = torch.device("cuda")
    kernels: dict[str, Attn] = {
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    if (fa := fa4()) is not None:
        kernels["fa4-cute"] = fa
    results: list[dict[str, Any]] = []
    first_use: dict[str, float] = {}
    H, D, L = 12, 128, 1560
    for lanes in (1, 2, 4):
        for key_frames in (6, 3):
            gen = torch.Generator(device=device).manual_seed(lanes * 10 + key_frames)
            shape = (lanes, H, L, D)
            q = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
            k, v = (
                torch.randn(lanes, H, L * key_frames, D, device=device, dtype=torch.bfloat16, generator=gen)
                for _ in range(2)
            )
            for name, kernel in kernels.items():
                row: dict[str, Any] = {"kernel": name, "lanes": lanes, "key_tokens": L * key_frames}
                try:
                    if name not in first_use:  # FA4 compiles its kernel at the first call
                        t0 = time.perf_counter()
                        kernel(q, k, v)
                        torch.cuda.synchronize()
                        first_use[name] = time.perf_counter() - t0
                    row.update(measure(kernel, q, k, v, graph=lanes == 2 and key_frames == 6))
                except Exception as exc:  # a kernel that refuses this shape: reported, the rest still run
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(json.dumps(row), flush=True)
                results.append(row)
    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "first_use_s": first_use,
        "rows": results,
    }
    with open(out_path, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
