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
        ("default", dict(channels_last=False)),
        ("channels_last", dict(channels_last=True)),
        ("channels_last+stack", dict(channels_last=True, conv2d="stack")),
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


def dit_profile(c, H=480, W=832, lanes=2) -> dict:
    """Top CUDA kernels of one steady-state stream-batch DiT call (compiled, not graphed)."""
    from torch.profiler import ProfilerActivity, profile

    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings

    c.optimize()
    steps = (700, 500, 400, 200)[:lanes]
    s = StreamSession(c, StreamSettings(height=H, width=W, steps=steps, decoder="taehv", encoder="taehv"))
    s.set_prompt_embeddings(torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16))
    frames = (torch.rand(5 + 4 * 12, H, W, 3) * 255).to(torch.uint8).pin_memory()
    s.push(frames[:5])
    for i in range(10):
        s.push(frames[5 + 4 * i : 9 + 4 * i]).cpu()
    torch.cuda.synchronize()
    den = s.denoiser
    lanes_state = den._lanes
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            den._forward(lanes_state.hidden, lanes_state.timesteps, lanes_state.starts, s._cross_kv())
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
    print(table, flush=True)
    return {"table": table}


def gelu_epilogue() -> dict:
    """Which GELU does cuBLASLt's epilogue compute? Compare in float32 with the tanh and erf forms."""
    x = torch.randn(4096, 1536, device="cuda")
    lin = torch.nn.Linear(1536, 2048).cuda()
    ep = torch._addmm_activation(lin.bias, x, lin.weight.t(), use_gelu=True)
    pre = lin(x)
    d_tanh = (ep - F.gelu(pre, approximate="tanh")).abs().max().item()
    d_erf = (ep - F.gelu(pre)).abs().max().item()
    print(f"gelu epilogue: max|diff| vs tanh {d_tanh:.2e}, vs erf {d_erf:.2e}", flush=True)
    return {"vs_tanh": d_tanh, "vs_erf": d_erf}


def overlap(c, H=480, W=832) -> dict:
    """Could the VAE run beside the DiT? Time a DiT step (graph replay), a Wan VAE decode and an encode
    alone, then the DiT step and the decode (and the encode) launched together on two streams."""
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings

    if not c.optimized:
        c.optimize()
    s = StreamSession(c, StreamSettings(height=H, width=W, steps=(700, 500)))
    s.set_prompt_embeddings(torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16))
    frames = (torch.rand(5 + 4 * 12, H, W, 3) * 255).to(torch.uint8).pin_memory()
    s.push(frames[:5])
    for i in range(10):
        s.push(frames[5 + 4 * i : 9 + 4 * i]).cpu()
    den, lanes = s.denoiser, s.denoiser._lanes
    cross = s._cross_kv()
    vae = c.wan_vae
    es, ds = VAEEncodeState(), VAEDecodeState()
    f5 = torch.rand(1, 3, 5, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
    f4 = torch.rand(1, 3, 4, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
    z2 = torch.randn(1, 16, 2, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    z1 = torch.randn(1, 16, 1, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    vae.stream_encode(f5, es)
    vae.stream_decode(z2, ds)
    dit = lambda: den._forward(lanes.hidden, lanes.timesteps, lanes.starts, cross)  # noqa: E731
    dec = lambda: vae.stream_decode(z1, ds)  # noqa: E731
    enc = lambda: vae.stream_encode(f4, es)  # noqa: E731
    t_dit, t_dec, t_enc = timed(dit), timed(dec), timed(enc)
    side = torch.cuda.Stream()

    def together(*others):
        def run():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for fn in others:
                    fn()
            dit()
            torch.cuda.current_stream().wait_stream(side)

        return run

    t_dit_dec = timed(together(dec))
    t_all = timed(together(enc, dec))
    print(
        f"overlap: DiT {t_dit:.1f} ms, decode {t_dec:.1f}, encode {t_enc:.1f}; DiT‖decode {t_dit_dec:.1f} "
        f"(serial {t_dit + t_dec:.1f}); DiT‖(encode+decode) {t_all:.1f} (serial {t_dit + t_dec + t_enc:.1f})",
        flush=True,
    )
    return {"dit": t_dit, "decode": t_dec, "encode": t_enc, "dit_decode": t_dit_dec, "all": t_all}


def vae_profile(c, H=480, W=832) -> dict:
    """Where the Wan VAE's time goes (conv vs everything else), then a whole-encoder/decoder compile."""
    from torch.profiler import ProfilerActivity, profile

    vae = c.wan_vae
    vae.optimize(channels_last=True)
    es, ds = VAEEncodeState(), VAEDecodeState()
    f5 = torch.rand(1, 3, 5, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
    f4 = torch.rand(1, 3, 4, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
    z2 = torch.randn(1, 16, 2, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    z1 = torch.randn(1, 16, 1, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    vae.stream_encode(f5, es)
    vae.stream_decode(z2, ds)
    for _ in range(3):
        vae.stream_encode(f4, es)
        vae.stream_decode(z1, ds)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        vae.stream_encode(f4, es)
        vae.stream_decode(z1, ds)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)
    out = {}
    for name, module in (("encoder", vae.encoder), ("decoder", vae.decoder)):
        module.forward = torch.compile(module.forward, dynamic=False)
    t0 = time.perf_counter()
    es, ds = VAEEncodeState(), VAEDecodeState()
    vae.stream_encode(f5, es)
    vae.stream_decode(z2, ds)
    for _ in range(2):
        vae.stream_encode(f4, es)
        vae.stream_decode(z1, ds)
    torch.cuda.synchronize()
    out["compile_s"] = time.perf_counter() - t0
    out["encode_ms"] = timed(lambda: vae.stream_encode(f4, es))
    out["decode_ms"] = timed(lambda: vae.stream_decode(z1, ds))
    print(f"whole compiled VAE: encode {out['encode_ms']:.1f} ms decode {out['decode_ms']:.1f} ms (compile {out['compile_s']:.0f} s)", flush=True)
    return out


def vae_check(c, H=480, W=832) -> dict:
    """The compiled VAE computes what the eager one does (bf16: rounding-level differences only)."""
    vae = c.wan_vae
    f = torch.rand(1, 3, 13, H, W, device="cuda", dtype=torch.bfloat16) * 2 - 1
    z = torch.randn(1, 16, 4, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)

    def stream() -> tuple[torch.Tensor, torch.Tensor]:
        es, ds = VAEEncodeState(), VAEDecodeState()
        enc = torch.cat([vae.stream_encode(f[:, :, :5], es), vae.stream_encode(f[:, :, 5:9], es),
                         vae.stream_encode(f[:, :, 9:], es)], 2).float()
        dec = torch.cat([vae.stream_decode(z[:, :, :2], ds), vae.stream_decode(z[:, :, 2:3], ds),
                         vae.stream_decode(z[:, :, 3:], ds)], 2).float()
        return enc, dec

    vae.optimize(channels_last=True, compile=False)
    e0, d0 = stream()
    vae.optimize(channels_last=True, compile=True)
    e1, d1 = stream()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"compiled VAE vs eager (bf16): encode rel {rel(e1, e0):.2e}, decode rel {rel(d1, d0):.2e}", flush=True)
    return {"encode_rel": rel(e1, e0), "decode_rel": rel(d1, d0)}


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    what = sys.argv[2].split(",") if len(sys.argv) > 2 else ["attn", "tae", "vae", "dit"]
    c = random_components(torch.device("cuda"), torch.bfloat16)
    sections = {
        "attn": lambda: attention_backends(),
        "tae": lambda: taehv(c),
        "vae": lambda: vae_variants(c),
        "dit": lambda: dit_profile(c),
        "gelu": gelu_epilogue,
        "overlap": lambda: overlap(c),
        "vaeprof": lambda: vae_profile(c),
        "vaecheck": lambda: vae_check(c),
    }
    results = {}
    for name in what:
        try:
            results[name] = sections[name]()
        except Exception as exc:  # one failing section must not hide the others
            print(f"section {name} failed: {type(exc).__name__}: {exc}", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1, default=str)
