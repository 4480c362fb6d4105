"""GPU micro-benchmarks that guide the optimisation work (run on the device machine).

Times, at 480x832 with full-size random weights: the Wan VAE per chunk (encode 4 frames, decode 1
latent) in each layout variant, TAEHV per chunk, and the attention backends on the DiT's shapes.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from wanstream.bench import random_components
from wanstream.models.tae import TAEDecodeState, TAEEncodeState
from wanstream.models.vae import VAEDecodeState, VAEEncodeState


def timed(fn, iters: int = 10, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def vae_variants(c, H=480, W=832) -> dict:
    vae = c.wan_vae
    out = {}
    frames5 = torch.rand(1, 3, 5, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
    frames4 = torch.rand(1, 3, 4, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
    z2 = torch.randn(1, 16, 2, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    z1 = torch.randn(1, 16, 1, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    variants = [
        ("default", dict(channels_last=False, conv2d=False)),
        ("channels_last", dict(channels_last=True)),
        ("channels_last+conv2d", dict(channels_last=True, conv2d=True)),
    ]
    ref_enc = ref_dec = None
    for name, kw in variants:
        if name == "default":
            pass
        else:
            vae.optimize(**kw)
        es, ds = VAEEncodeState(), VAEDecodeState()
        vae.stream_encode(frames5, es)
        vae.stream_decode(z2, ds)
        t0 = time.perf_counter()
        enc = timed(lambda: vae.stream_encode(frames4, es))
        dec = timed(lambda: vae.stream_decode(z1, ds))
        es2, ds2 = VAEEncodeState(), VAEDecodeState()
        e_out = torch.cat([vae.stream_encode(frames5, es2), vae.stream_encode(frames4, es2)], 2).float()
        d_out = torch.cat([vae.stream_decode(z2, ds2), vae.stream_decode(z1, ds2)], 2).float()
        if ref_enc is None:
            ref_enc, ref_dec = e_out, d_out
        rel = lambda a, b: float((a - b).norm() / b.norm())
        out[name] = dict(
            encode_ms=enc,
            decode_ms=dec,
            enc_rel=rel(e_out, ref_enc),
            dec_rel=rel(d_out, ref_dec),
            wall_s=time.perf_counter() - t0,
        )
        print(
            f"wan vae {name}: encode {enc:.1f} ms decode {dec:.1f} ms  (rel vs default {out[name]['enc_rel']:.1e} / {out[name]['dec_rel']:.1e})",
            flush=True,
        )
    return out


def taehv(c, H=480, W=832) -> dict:
    tae = c.taehv
    es, ds = TAEEncodeState(), TAEDecodeState(warmup_frames=3)
    f5 = torch.rand(1, 5, 3, H, W, device="cuda", dtype=torch.float16) * 2 - 1
    f4 = torch.rand(1, 4, 3, H, W, device="cuda", dtype=torch.float16) * 2 - 1
    z2 = torch.randn(1, 2, 16, H // 8, W // 8, device="cuda", dtype=torch.float16)
    z1 = torch.randn(1, 1, 16, H // 8, W // 8, device="cuda", dtype=torch.float16)
    tae.stream_encode(f5, es)
    tae.stream_decode(z2, ds)
    enc = timed(lambda: tae.stream_encode(f4, es))
    dec = timed(lambda: tae.stream_decode(z1, ds))
    tae.to(memory_format=torch.channels_last)
    enc_cl = timed(lambda: tae.stream_encode(f4, es))
    dec_cl = timed(lambda: tae.stream_decode(z1, ds))
    print(
        f"taehv: encode {enc:.2f} ms decode {dec:.2f} ms; channels_last encode {enc_cl:.2f} decode {dec_cl:.2f}",
        flush=True,
    )
    return dict(encode_ms=enc, decode_ms=dec, encode_cl_ms=enc_cl, decode_cl_ms=dec_cl)


def attention_backends() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for B, Lq, Lk in ((1, 1560, 9360), (2, 1560, 9360), (1, 3120, 3120), (1, 1024, 6144), (2, 1024, 6144)):
        q = torch.randn(B, 12, Lq, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, 12, Lk, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qt = torch.randn(B, Lq, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # our layout
        row = {}
        for name, be in (
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):
            try:
                with sdpa_kernel(be):
                    row[name] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
                    row[name + "_strided_q"] = timed(lambda: F.scaled_dot_product_attention(qt, k, v))
            except RuntimeError as exc:
                row[name] = str(exc)[:60]
        row["default"] = timed(lambda: F.scaled_dot_product_attention(qt, k, v))
        flops = 4 * B * 12 * Lq * Lk * 128
        out[f"{B}x{Lq}x{Lk}"] = row
        print(
            f"attn B{B} {Lq}x{Lk}: "
            + ", ".join(f"{k}={v:.3f}ms" if isinstance(v, float) else f"{k}=ERR" for k, v in row.items())
            + f"  ({flops / (row['default'] / 1000) / 1e12:.0f} TFLOP/s default)",
            flush=True,
        )
    return out


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    c = random_components(torch.device("cuda"), torch.bfloat16)
    results = {"attention": attention_backends(), "taehv": taehv(c), "wan_vae": vae_variants(c)}
    if len(sys.argv) > 1:
        json.dump(results, open(sys.argv[1], "w"), indent=1)
