"""`wanstream bench`: throughput, latency and memory of the full-size pipeline on random weights."""

from __future__ import annotations

import argparse
import sys
from typing import get_args

DEFAULT_CONFIGS_ARG = "batch,480x832,2,wan;batch,480x832,2,fast;batch,480x832,2,taehv;nobatch,512x512,1,taehv"
# --tiny is a smoke test of the benchmark itself: the same four kinds of config at a small size and a few
# chunks, so it ends in seconds on a laptop CPU (the tiny Wan VAE alone takes ~10 s a chunk at 480x832).
TINY_CONFIGS_ARG = "batch,48x48,2,wan;batch,48x48,2,fast;batch,48x48,2,taehv;nobatch,48x48,1,taehv"
TINY_CHUNKS, TINY_WARM_CHUNKS = 2, 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure FPS, latency, time to first frame and memory (full-size random weights, no download)",
        description="Full-size networks with RANDOM weights (no download: the compute is identical). "
        "Configs are mode,HxW,steps,codecs: mode batch|nobatch, steps 1-4, codecs wan (Wan VAE both ways), "
        "taehv (TAEHV both ways), fast (Wan encoder + TAEHV decoder), vace (nobatch only: the input as VACE "
        "control frames in text mode, Scope's setup, Wan VAE both ways; the VACE encode is its own column) or "
        "text (the same stream with VACE off: vace's baseline).",
    )
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS_ARG,
        help="';'-separated configs, or 'all' for every combination (default: %(default)s; with --gpus: "
        "batch at 480x832 and 512x512, 1-4 steps, wan)",
    )
    p.add_argument(
        "--chunks", type=int, help=f"steady-state chunks per config (default 30; {TINY_CHUNKS} with --tiny)"
    )
    p.add_argument(
        "--warm-chunks", type=int, help=f"chunks before measuring (default 8; {TINY_WARM_CHUNKS} with --tiny)"
    )
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny networks, small frames and few chunks: a CPU smoke test of the benchmark itself (seconds)",
    )
    p.add_argument("--no-compile", action="store_true", help="run the DiT eagerly (no torch.compile)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="do not replay CUDA graphs")
    p.add_argument(
        "--reproducible",
        action="store_true",
        help="cuDNN's conv algorithms by heuristics and Inductor's first launch configurations, as `serve "
        "--reproducible-takes` runs (what it costs)",
    )
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
    p.add_argument(
        "--live-changes",
        action="store_true",
        help="after the configs, one stream of the first config through a prompt change, a hard cut and "
        "steps changed live 2 -> 3 -> 1, timed per chunk",
    )
    add_memory_flags(p)
    p.add_argument(
        "--with-text-encoder",
        action="store_true",
        help="also build a random full-size umT5-XXL, placed by --text-encoder: in the peak memory, with the "
        "prompt-change latency (new prompt -> first frame under it)",
    )
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        metavar="GIB",
        help="cap this process's GPU memory at GIB before anything is allocated "
        "(torch.cuda.set_per_process_memory_fraction): a run that completes fits a card of that size",
    )
    p.add_argument(
        "--write-estimates",
        metavar="FILE",
        help="add the measured memory and FPS per config to this estimates table (JSON; the default "
        "location generate and serve read is ~/.cache/wanstream/estimates.json, or $WANSTREAM_ESTIMATES)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="one stream over GPUs 0..N-1 (pipeline parallel), compared with one GPU: FPS and scaling "
        "efficiency (docs/multigpu.md); with --device cpu and --tiny, a smoke test on CPU processes",
    )
    p.add_argument(
        "--rebalance", action="store_true", help="with --gpus: also measure after the block rebalancer"
    )
    p.add_argument("--no-baseline", action="store_true", help="with --gpus: skip the one-GPU comparison runs")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from wanstream.bench.single import DEFAULT_CONFIGS, BenchConfig, run_bench
    from wanstream.cli.parsers import parse_device
    from wanstream.engine.settings import LoraMode
    from wanstream.jobs.generate import GenerateError

    if args.tiny and args.gpus == 1:
        if args.configs == DEFAULT_CONFIGS_ARG:
            args.configs = TINY_CONFIGS_ARG
        args.chunks = TINY_CHUNKS if args.chunks is None else args.chunks
        args.warm_chunks = TINY_WARM_CHUNKS if args.warm_chunks is None else args.warm_chunks
        print(
            f"tiny smoke test: {len(args.configs.split(';'))} config(s) ({args.configs}), "
            f"{args.warm_chunks} warm-up + {args.chunks} measured chunks each; the figures test the "
            "benchmark, not a model"
        )
    args.chunks = 30 if args.chunks is None else args.chunks
    args.warm_chunks = 8 if args.warm_chunks is None else args.warm_chunks
    try:
        configs = (
            DEFAULT_CONFIGS
            if args.configs == "all"
            else [BenchConfig.parse(c) for c in args.configs.split(";") if c.strip()]
        )
        lora_modes = tuple(m.strip() for m in args.lora_mode.split(",") if m.strip())
        if args.chunks < 1 or args.warm_chunks < 0:
            raise ValueError(
                f"--chunks {args.chunks} / --warm-chunks {args.warm_chunks}: measure 1 or more chunks after "
                "0 or more warm-up chunks"
            )
        device = parse_device(args.device)
        if args.lora_rank is not None and args.lora_rank < 1:
            raise ValueError(f"--lora-rank {args.lora_rank}: give a rank of at least 1")
        variants = ("none", *get_args(LoraMode))  # none: the config without a LoRA
        if not lora_modes or any(m not in variants for m in lora_modes):
            raise ValueError(f"--lora-mode {args.lora_mode!r}: comma-separated {', '.join(variants)}")
        if args.live_changes and configs and configs[0].text_mode:
            raise ValueError(
                f"--live-changes runs the first config's video stream; {configs[0].name} is text mode"
            )
        if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
            raise ValueError(f"--memory-limit-gib {args.memory_limit_gib}: give a positive size")
        if args.gpus != 1 and (problem := _ring_problem(args, configs)):
            raise ValueError(problem)
    except (ValueError, GenerateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.gpus != 1:
        return _run_gpus(args, configs)
    if device.type == "cpu" and not args.tiny:
        print(
            "note: no GPU — full-size networks on the CPU take minutes per chunk; use --tiny for a smoke test",
            file=sys.stderr,
        )
    low = low_vram_choices(args)
    if args.low_vram and args.configs in (DEFAULT_CONFIGS_ARG, TINY_CONFIGS_ARG):  # the profile's codecs
        configs = [BenchConfig(c.batching, c.height, c.width, c.steps, "taehv") for c in configs]
        configs = list(dict.fromkeys(configs))
    run_bench(
        configs,
        device=device,
        precision=low["precision"],
        text_encoder=low["text_encoder"] if args.with_text_encoder else None,
        memory_limit_gib=args.memory_limit_gib,
        write_estimates=args.write_estimates,
        tiny=args.tiny,
        chunks=args.chunks,
        warm_chunks=args.warm_chunks,
        compile=not args.no_compile,
        graphs=not args.no_cuda_graphs,
        vae_layout=args.vae_layout,
        json_path=args.json_path,
        lora_rank=args.lora_rank,
        lora_modes=lora_modes,
        live_changes=args.live_changes,
        reproducible=args.reproducible,
    )
    return 0


def add_memory_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--text-encoder, --precision and --low-vram: the memory choices (docs/memory.md), shared by
    generate, serve and bench."""
    from wanstream.models.placement import PRECISIONS, TEXT_PLACEMENTS

    p.add_argument(
        "--text-encoder",
        dest="text_placement",
        choices=TEXT_PLACEMENTS,
        default="auto",
        help="where the umT5 text encoder lives: gpu, fp8 (float8 weights on the GPU), host (pinned host "
        "memory, moved in per new prompt); auto = host on a GPU (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16",
        help="the DiT's weights: fp8 keeps the blocks' linear weights in float8 (half their memory); on a GPU "
        "with float8 GEMMs (compute capability >= 8.9) its q/k/v and FFN layers also compute in float8, "
        "elsewhere the arithmetic stays bf16 (default: %(default)s)",
    )
    p.add_argument(
        "--low-vram",
        action="store_true",
        help="the low-memory profile for 16 GB cards: text encoder on the host, fp8 DiT weights, TAEHV",
    )


def low_vram_choices(args: argparse.Namespace) -> dict[str, str]:
    """The text-encoder placement and precision the flags ask for (--low-vram overrides both)."""
    from wanstream.pipeline import LOW_VRAM_LOAD

    if args.low_vram:
        return dict(LOW_VRAM_LOAD)
    return {"text_encoder": args.text_placement, "precision": args.precision}


def _ring_problem(args: argparse.Namespace, configs: list) -> str | None:
    """Why `--gpus N` cannot run as asked, or None."""
    import torch

    from wanstream.engine.settings import RING_LORA_PROBLEM

    if args.gpus < 2:
        return f"--gpus {args.gpus}: a ring needs 2 or more (one GPU is the plain benchmark)"
    if args.device != "cpu" and torch.cuda.device_count() < args.gpus:
        return (
            f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use fewer, "
            "or --device cpu --tiny for a smoke test on CPU processes"
        )
    if args.lora_rank is not None:
        return f"--lora-rank with --gpus: {RING_LORA_PROBLEM}"
    if any(c.text_mode for c in configs):
        return "codecs vace and text are not supported with --gpus (a ring runs video streams)"
    return None


def _run_gpus(args: argparse.Namespace, configs: list) -> int:
    from wanstream.bench.ring import RING_CONFIGS, run_parallel_bench
    from wanstream.bench.single import BenchConfig

    if args.configs == DEFAULT_CONFIGS_ARG:
        configs = [BenchConfig.parse(c) for c in RING_CONFIGS.split(";")]
    run_parallel_bench(
        configs,
        gpus=args.gpus,
        device="cpu" if args.device == "cpu" else "cuda",
        tiny=args.tiny,
        chunks=args.chunks,
        warm_chunks=args.warm_chunks,
        compile=not args.no_compile,
        baseline=not args.no_baseline,
        rebalance=args.rebalance,
        json_path=args.json_path,
    )
    return 0
