"""Where the Wan VAE's time goes at 480x832 (issue "Performance II"), on the device machine.

Full-size Wan VAE, random weights, bf16, laid out and compiled as the product runs it (`optimize()`):
1. per chunk: encode 4 frames / decode 1 latent, steady state, CUDA events (median of 10);
2. per conv layer: every convolution the steady chunk runs, timed alone on its real input shape with cuDNN's
   autotuned engine, with its FLOPs and TFLOP/s (the sum against the chunk time says what is not convolution);
3. the torch profiler's kernels for one compiled chunk of each half, in classes (convolution, fused Triton
   elementwise / norm, copies) and the top kernels by time;
4. cuDNN autotuning off vs on for the compiled chunk;
5. experiments on the slow convs (`conv_experiments`), and the full-resolution 3x3x3 convs through conv2d
   kernels (`reformulation_experiments`).
Usage (repo root, after `source tools/gpu/env.sh`): python3 tools/gpu/vae_profile.py OUT.json [HEIGHT WIDTH]
(`--experiments-only`: 5. alone; `--reformulations-only`: the conv2d forms alone.)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from math import prod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from wanstream.models.vae import VAEDecodeState, VAEEncodeState, WanVAE


def timed(fn: Callable[[], Any], iters: int = 10, warm: int = 3) -> float:
    """Median milliseconds of `fn` on the GPU."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@contextmanager
def recording_convs(calls: list[dict[str, Any]]):
    """Record every F.conv2d / F.conv3d call (shapes, stride, padding) made inside the block."""
    originals = {"conv2d": F.conv2d, "conv3d": F.conv3d}

    def wrap(name: str) -> Callable[..., torch.Tensor]:
        def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            y = originals[name](x, weight, bias, stride, padding, dilation, groups)
            calls.append(
                {
                    "op": name,
                    "input": list(x.shape),
                    "weight": list(weight.shape),
                    "output": list(y.shape),
                    "stride": stride,
                    "padding": padding,
                    "flops": 2 * y.numel() * prod(weight.shape[1:]),
                }
            )
            return y

        return conv

    F.conv2d, F.conv3d = wrap("conv2d"), wrap("conv3d")
    try:
        yield
    finally:
        F.conv2d, F.conv3d = originals["conv2d"], originals["conv3d"]


def time_conv(call: dict[str, Any]) -> float:
    fmt = torch.channels_last_3d if call["op"] == "conv3d" else torch.channels_last
    x = torch.randn(call["input"], device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
    w = torch.randn(call["weight"], device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt) * 0.02
    b = torch.zeros(call["weight"][0], device="cuda", dtype=torch.bfloat16)
    op = F.conv3d if call["op"] == "conv3d" else F.conv2d
    return timed(lambda: op(x, w, b, call["stride"], call["padding"]))


def conv3d_as_conv2d_taps(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A 3x3x3 conv (temporal padding already in `x`: T+2 frames in, T out) as the sum of three 3x3 conv2d
    over all T frames at once, one per temporal tap: the same FLOPs through conv2d's (better tuned) kernels,
    plus two adds of the output."""
    B, C, T2, H, W = x.shape
    T = T2 - 2
    frames = x.transpose(1, 2)  # [B, T+2, C, H, W]
    out = None
    for k in range(3):
        tap = frames[:, k : k + T].reshape(B * T, C, H, W)
        y = F.conv2d(tap, w[:, :, k], None, 1, 1)
        out = y if out is None else out + y
    assert out is not None
    return out.reshape(B, T, -1, H, W).transpose(1, 2)


def conv3d_as_stacked_conv2d(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same conv as one 3x3 conv2d whose input channels are the three temporal taps side by side (3C
    channels, one GEMM of the same K = 27C): a copy of the input three times over, one output write."""
    B, C, T2, H, W = x.shape
    T = T2 - 2
    frames = x.permute(0, 2, 3, 4, 1)  # [B, T+2, H, W, C]: a view of channels-last-3d input
    stacked = torch.cat([frames[:, k : k + T] for k in range(3)], dim=-1)  # the one copy: [B, T, H, W, 3C]
    stacked = stacked.reshape(B * T, H, W, 3 * C).permute(0, 3, 1, 2)  # NCHW shape, channels-last strides
    w2 = w.permute(0, 2, 1, 3, 4).reshape(w.shape[0], 3 * C, 3, 3)  # [O, (tap, C), 3, 3]
    return F.conv2d(stacked, w2, None, 1, 1).reshape(B, T, -1, H, W).transpose(1, 2)


def _time_forms(x: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    ref = F.conv3d(x, w, None, 1, (0, 1, 1))
    row: dict[str, Any] = {"conv3d": timed(lambda: F.conv3d(x, w, None, 1, (0, 1, 1)))}
    w2d = w.contiguous()  # the conv2d forms slice their 3x3 taps out of it
    for form, fn in (("taps", conv3d_as_conv2d_taps), ("stacked", conv3d_as_stacked_conv2d)):
        try:
            got = fn(x, w2d)
            row[f"{form}_rel_err"] = float((got.float() - ref.float()).norm() / ref.float().norm())
            row[form] = timed(lambda fn=fn: fn(x, w2d))
            compiled = torch.compile(fn)  # the adds and copies fused by Inductor
            compiled(x, w2d)
            row[f"{form}_compiled"] = timed(lambda c=compiled: c(x, w2d))
        except Exception as exc:  # an experiment: record why it did not run
            row[f"{form}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def reformulation_experiments() -> dict[str, Any]:
    """The full-resolution 96-channel 3x3x3 conv (half the decoder's time, 375 TFLOP/s at cuDNN's best conv3d
    engine) through conv2d kernels instead: timed against conv3d on the same input, with their difference."""
    out: dict[str, Any] = {}
    for name, (xs, ws) in {
        "c96_full": ((1, 96, 6, 480, 832), (96, 96, 3, 3, 3)),
        "c192_half": ((1, 192, 6, 240, 416), (192, 192, 3, 3, 3)),
    }.items():
        x = torch.randn(xs, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last_3d
        )
        w = (torch.randn(ws, device="cuda", dtype=torch.bfloat16) * 0.02).contiguous(
            memory_format=torch.channels_last_3d
        )
        out[name] = row = _time_forms(x, w)
        print(
            f"{name} reformulated:", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        )
    return out


def conv_experiments() -> dict[str, Any]:
    """Cheaper engines for the convs that run far below the others (per-layer table of call 15): cuDNN's full
    engine search, padded channel counts for the 3-channel head / input convs, inductor's Triton conv template."""

    def run(op, xs, ws, stride=1, padding=(0, 1, 1), fmt=torch.channels_last_3d) -> float:
        x = torch.randn(xs, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
        w = (torch.randn(ws, device="cuda", dtype=torch.bfloat16) * 0.02).contiguous(memory_format=fmt)
        return timed(lambda: op(x, w, None, stride, padding))

    out: dict[str, Any] = {}
    shapes = {
        "c96_full": ((1, 96, 6, 480, 832), (96, 96, 3, 3, 3)),
        "c192_half": ((1, 192, 6, 240, 416), (192, 192, 3, 3, 3)),
        "c384_quarter": ((1, 384, 4, 120, 208), (384, 384, 3, 3, 3)),
        "head_96_to_3": ((1, 96, 6, 480, 832), (3, 96, 3, 3, 3)),
        "head_96_to_8": ((1, 96, 6, 480, 832), (8, 96, 3, 3, 3)),
        "head_96_to_16": ((1, 96, 6, 480, 832), (16, 96, 3, 3, 3)),
        "in_3_to_96": ((1, 3, 6, 480, 832), (96, 3, 3, 3, 3)),
        "in_8_to_96": ((1, 8, 6, 480, 832), (96, 8, 3, 3, 3)),
        "in_16_to_96": ((1, 16, 6, 480, 832), (96, 16, 3, 3, 3)),
    }
    for limit in (10, 0):  # 10: torch's default number of cuDNN engines tried; 0: all of them
        torch.backends.cudnn.benchmark_limit = limit
        out[f"benchmark_limit_{limit}"] = {k: run(F.conv3d, xs, ws) for k, (xs, ws) in shapes.items()}
        print(
            f"cudnn benchmark_limit {limit}:",
            {k: round(v, 3) for k, v in out[f"benchmark_limit_{limit}"].items()},
            flush=True,
        )
    torch.backends.cudnn.benchmark_limit = 10
    try:  # inductor's own conv kernels against cuDNN, for the slowest shape
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune_conv_backends = "ATEN,TRITON"
        xs, ws = shapes["c96_full"]
        conv = torch.compile(
            lambda x, w: F.conv3d(x, w, None, 1, (0, 1, 1)), mode="max-autotune-no-cudagraphs"
        )
        x = torch.randn(xs, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last_3d
        )
        w = (torch.randn(ws, device="cuda", dtype=torch.bfloat16) * 0.02).contiguous(
            memory_format=torch.channels_last_3d
        )
        out["c96_full_max_autotune"] = timed(lambda: conv(x, w))
        print("c96_full max-autotune:", round(out["c96_full_max_autotune"], 3), flush=True)
    except Exception as exc:  # an experiment: record why it did not run
        out["c96_full_max_autotune_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def kernel_classes(prof: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if t and evt.device_type == torch.autograd.DeviceType.CUDA:
            by_name[evt.key][0] += t / 1000
            by_name[evt.key][1] += evt.count
    classes: dict[str, float] = defaultdict(float)
    for name, (ms, _) in by_name.items():
        low = name.lower()
        if any(k in low for k in ("conv", "xmma", "implicit", "cudnn", "sm90", "cutlass", "gemm", "wgrad")):
            cls = "convolution"
        elif low.startswith("triton"):
            cls = "triton (fused norm / SiLU / cat / elementwise)"
        elif any(k in low for k in ("copy", "cat", "memcpy", "memset", "fill")):
            cls = "copies"
        else:
            cls = "other"
        classes[cls] += ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:20]
    return dict(classes), [{"kernel": k[:160], "ms": v[0], "count": v[1]} for k, v in top]


def main(out: str, height: int = 480, width: int = 832) -> None:
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    torch.manual_seed(0)
    vae = WanVAE().to(dev, torch.bfloat16).eval().requires_grad_(False)
    frames5 = torch.rand(1, 3, 5, height, width, device=dev, dtype=torch.bfloat16) * 2 - 1
    frames4 = torch.rand(1, 3, 4, height, width, device=dev, dtype=torch.bfloat16) * 2 - 1
    z2 = torch.randn(1, 16, 2, height // 8, width // 8, device=dev, dtype=torch.bfloat16)
    z1 = torch.randn(1, 16, 1, height // 8, width // 8, device=dev, dtype=torch.bfloat16)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "size": [height, width]}

    # Eager channels-last: record the convolutions of one steady chunk of each half.
    vae.optimize(channels_last=True, compile=False)
    es, ds = VAEEncodeState(), VAEDecodeState()
    vae.stream_encode(frames5, es)
    vae.stream_decode(z2, ds)
    result["eager_channels_last_ms"] = {
        "encode": timed(lambda: vae.stream_encode(frames4, es)),
        "decode": timed(lambda: vae.stream_decode(z1, ds)),
    }
    layers: dict[str, list[dict[str, Any]]] = {}
    for half, fn in (
        ("encode", lambda: vae.stream_encode(frames4, es)),
        ("decode", lambda: vae.stream_decode(z1, ds)),
    ):
        calls: list[dict[str, Any]] = []
        with torch.no_grad(), recording_convs(calls):
            fn()
        for call in calls:
            call["ms"] = time_conv(call)
            call["tflops"] = call["flops"] / (call["ms"] / 1000) / 1e12
        layers[half] = calls
        total_ms = sum(c["ms"] for c in calls)
        total_flops = sum(c["flops"] for c in calls)
        print(
            f"{half}: {len(calls)} convs, {total_ms:.1f} ms alone, {total_flops / 1e12:.2f} TFLOP "
            f"({total_flops / (total_ms / 1000) / 1e12:.0f} TFLOP/s)",
            flush=True,
        )
        result[f"{half}_convs_alone_ms"] = total_ms
        result[f"{half}_conv_tflop"] = total_flops / 1e12
    result["layers"] = layers

    # Compiled, as the product runs it.
    vae.optimize(channels_last=True, compile=True, background=False)
    es, ds = VAEEncodeState(), VAEDecodeState()
    vae.stream_encode(frames5, es)
    vae.stream_decode(z2, ds)
    compiled = {
        "encode": timed(lambda: vae.stream_encode(frames4, es)),
        "decode": timed(lambda: vae.stream_decode(z1, ds)),
    }
    result["compiled_ms"] = compiled
    for half in ("encode", "decode"):
        result[f"{half}_compiled_tflops"] = result[f"{half}_conv_tflop"] / (compiled[half] / 1000)
    print(f"compiled: encode {compiled['encode']:.1f} ms, decode {compiled['decode']:.1f} ms", flush=True)
    torch.backends.cudnn.benchmark = False
    result["compiled_ms_without_cudnn_autotune"] = {
        "encode": timed(lambda: vae.stream_encode(frames4, es)),
        "decode": timed(lambda: vae.stream_decode(z1, ds)),
    }
    torch.backends.cudnn.benchmark = True
    from torch.profiler import ProfilerActivity, profile

    for half, fn in (
        ("encode", lambda: vae.stream_encode(frames4, es)),
        ("decode", lambda: vae.stream_decode(z1, ds)),
    ):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        classes, top = kernel_classes(prof)
        result[f"{half}_kernel_classes_ms"] = classes
        result[f"{half}_top_kernels"] = top
        print(half, {k: round(v, 2) for k, v in classes.items()}, flush=True)
    Path(out).write_text(json.dumps(result, indent=1))
    result["experiments"] = conv_experiments()
    result["reformulations"] = reformulation_experiments()
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--reformulations-only" in args:  # the conv2d forms alone (matrix part T's last minute)
        args.remove("--reformulations-only")
        torch.backends.cudnn.benchmark = True
        Path(args[0]).write_text(json.dumps({"reformulations": reformulation_experiments()}, indent=1))
        sys.exit(0)
    if "--experiments-only" in args:
        args.remove("--experiments-only")
        torch.backends.cudnn.benchmark = True
        experiments = {"experiments": conv_experiments(), "reformulations": reformulation_experiments()}
        Path(args[0]).write_text(json.dumps(experiments, indent=1))
        sys.exit(0)
    main(args[0] if args else "vae_profile.json", *(int(a) for a in args[1:3]))
