"""`wanstream bench`: throughput, latency and memory of the full-size pipeline on random weights."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure FPS, latency, time to first frame and memory (full-size random weights, no download)",
        description="Full-size networks with RANDOM weights (no download: the compute is identical). "
        "Configs are mode,HxW,steps,codecs: mode batch|nobatch, steps 1-4, codecs wan (Wan VAE both ways), "
        "taehv (TAEHV both ways) or fast (Wan encoder + TAEHV decoder).",
    )
    p.add_argument(
        "--configs",
        default="batch,480x832,2,wan;batch,480x832,2,fast;batch,480x832,2,taehv;nobatch,512x512,1,taehv",
        help="';'-separated configs, or 'all' for every combination (default: %(default)s)",
    )
    p.add_argument("--chunks", type=int, default=30, help="steady-state chunks per config (default 30)")
    p.add_argument("--warm-chunks", type=int, default=8, help="chunks before measuring (default 8)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument(
        "--tiny", action="store_true", help="tiny networks (a CPU smoke test of the benchmark itself)"
    )
    p.add_argument("--no-compile", action="store_true", help="run the DiT eagerly (no torch.compile)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="do not replay CUDA graphs")
    p.add_argument(
        "--vae-layout",
        choices=["default", "channels_last", "compiled"],
        default="compiled",
        help="Wan VAE: default (eager NCDHW), channels_last (eager), compiled (channels-last + torch.compile)",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="also run each config with a random rank-R LoRA on every attention/FFN linear (docs/lora.md)",
    )
    p.add_argument(
        "--lora-mode",
        default="none,merged,runtime",
        metavar="MODES",
        help="with --lora-rank: comma-separated variants among none, merged, runtime (default: %(default)s)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from wanstream.bench import DEFAULT_CONFIGS, BenchConfig, run_bench

    try:
        configs = (
            DEFAULT_CONFIGS
            if args.configs == "all"
            else [BenchConfig.parse(c) for c in args.configs.split(";") if c.strip()]
        )
        lora_modes = tuple(m.strip() for m in args.lora_mode.split(",") if m.strip())
        if args.lora_rank is not None and args.lora_rank < 1:
            raise ValueError(f"--lora-rank {args.lora_rank}: give a rank of at least 1")
        if not lora_modes or any(m not in ("none", "merged", "runtime") for m in lora_modes):
            raise ValueError(f"--lora-mode {args.lora_mode!r}: comma-separated none, merged, runtime")
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        print(
            "note: no GPU — full-size networks on the CPU take minutes per chunk; use --tiny for a smoke test"
        )
    run_bench(
        configs,
        device=device,
        tiny=args.tiny,
        chunks=args.chunks,
        warm_chunks=args.warm_chunks,
        compile=not args.no_compile,
        graphs=not args.no_cuda_graphs,
        vae_layout=args.vae_layout,
        json_path=args.json_path,
        lora_rank=args.lora_rank,
        lora_modes=lora_modes,
    )
    return 0
