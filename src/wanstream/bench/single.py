"""`wanstream bench`: full-size networks with random weights (no download) on the GPU.

Random weights do not change the work: every configuration runs the real DiT, cache, VAE and TAEHV
code at full size. The text encoder is not built (a random [1, 512, 4096] conditioning stands in);
prompt encoding happens once per prompt, outside the per-frame loop.

Measured per configuration (mode, resolution, steps, codecs):
* steady-state FPS: output frames / wall time over the steady window (chunks after warm-up, each
  chunk's output copied to the CPU, so nothing is left queued on the GPU);
* chunk latency p50/p90: wall time of one 4-frame chunk, input upload to output on the CPU;
* encode / DiT / decode split: CUDA events around each stage (medians);
* time to first frame: a fresh stream (warm compile caches), 5th input frame available → first output
  frame on the CPU;
* peak GPU memory; DiT TFLOP/s against a bf16 matmul measured in the same process;
* codecs `vace`: the product's VACE path (`generate --control-video`, a server stream with VACE on) in
  Daydream Scope's setup — text mode, no batching, the t = 0 cache pass, FIFO cache — with the input
  video as VACE control frames (depth / pose style: all-ones mask, two streaming Wan VAE encodes per
  chunk, the VACE blocks in every DiT step), Wan VAE decoder; the VACE encode is its own part
  (`vace_encode_ms_p50`). Codecs `text` is the same stream with VACE off (its baseline, same process);
* with `lora_rank`: each configuration again with a random LoRA of that rank on every attention and FFN
  linear of the DiT, merged and/or as runtime adapters (same process, same inputs), plus the time a
  scale change takes (`extra.lora_rescale_ms`: a re-merge, or an in-place copy of the adapters' scales).

DiT FLOPs per call (2 per multiply-add), d = dim, f = ffn, T = text tokens, per layer and query token:
12·d² (q, k, v, o, cross q, cross o) + 4·d·f (FFN) + 4·T·d (cross attention), plus 4·Lk·d of
self-attention per query token over Lk attended tokens; plus the patch embedding and head. Text K/V
projections are per prompt (cached) and not counted.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import torch

from wanstream.engine.components import Components
from wanstream.engine.lora import lora_manager
from wanstream.engine.measure import StageTimer, percentile
from wanstream.engine.memory import release_device_memory
from wanstream.engine.random_weights import random_components
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import DEFAULT_STEPS, Batching, LoraMode, LoraSpec, StreamSettings
from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.fastpath import COMPILES, FALLBACKS
from wanstream.models.fp8 import computes_in_float8
from wanstream.models.lora import linear_targets
from wanstream.weights.lora import LoraPair, LoraWeights

STEP_LISTS = {1: (700,), 2: (700, 500), 3: (700, 500, 400), 4: (700, 500, 400, 200)}
CODECS = {
    "wan": ("wan", "wan"),
    "taehv": ("taehv", "taehv"),
    "fast": ("wan", "taehv"),
    "vace": ("wan", "wan"),  # VACE's control frames go through the Wan encoder; no input video is encoded
    "text": ("wan", "wan"),
}
TEXT_MODE_CODECS = ("vace", "text")  # Scope's VACE stream: text mode, one chunk at a time, t = 0 cache pass


@dataclass(frozen=True)
class BenchConfig:
    batching: Batching
    height: int
    width: int
    steps: int
    codecs: str  # "wan" / "taehv" (both ways), "fast" (Wan encoder + TAEHV decoder), "vace", "text"

    @property
    def name(self) -> str:
        mode = "batch" if self.batching == "stream" else "nobatch"
        return f"{mode},{self.height}x{self.width},{self.steps},{self.codecs}"

    @classmethod
    def parse(cls, text: str) -> BenchConfig:
        """`mode,HxW,steps,codecs`: mode batch|nobatch, codecs wan|taehv|fast|vace|text (vace, text: nobatch)."""
        try:
            mode, res, steps, codecs = (p.strip() for p in text.split(","))
            h, w = (int(v) for v in res.lower().split("x"))
            if mode not in ("batch", "nobatch") or codecs not in CODECS or int(steps) not in STEP_LISTS:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad config {text!r}: expected mode,HxW,steps,codecs e.g. batch,480x832,2,wan "
                "(mode batch|nobatch, steps 1-4, codecs wan|taehv|fast|vace|text)"
            ) from None
        if codecs in TEXT_MODE_CODECS and mode != "nobatch":
            raise ValueError(
                f"bad config {text!r}: codecs {codecs} runs VACE's stream (one chunk at a time): use nobatch"
            )
        return cls("stream" if mode == "batch" else "none", h, w, int(steps), codecs)

    @property
    def text_mode(self) -> bool:
        return self.codecs in TEXT_MODE_CODECS

    def settings(self) -> StreamSettings:
        encoder, decoder = CODECS[self.codecs]
        if self.text_mode:  # Scope's VACE setup (and what `generate --control-video` runs)
            return StreamSettings(
                height=self.height,
                width=self.width,
                mode="text",
                steps=STEP_LISTS[self.steps],
                batching="none",
                cache_context="clean",
                eviction="fifo",
                sink_threshold=-1.0,
                encoder=encoder,  # type: ignore[arg-type]
                decoder=decoder,  # type: ignore[arg-type]
            )
        # "fast" mirrors the authors' --fast: TAEHV decoder and their fast cache (5 frames, 2 sinks,
        # adaptive sink off), so the comparison runs the same work.
        cache = dict(kv_cache_frames=5, sink_frames=2, sink_threshold=-1.0) if self.codecs == "fast" else {}
        return StreamSettings(
            height=self.height,
            width=self.width,
            steps=STEP_LISTS[self.steps],
            batching=self.batching,  # type: ignore[arg-type]
            encoder=encoder,  # type: ignore[arg-type]
            decoder=decoder,  # type: ignore[arg-type]
            **cache,
        )


DEFAULT_CONFIGS = [
    BenchConfig(b, h, w, s, c)
    for (h, w) in ((480, 832), (512, 512))
    for b in get_args(Batching)
    for s in (1, 2, 3, 4)
    for c in ("wan", "taehv", "fast")
]


# ------------------------------------------------------------------------------------------------
# Random full-size networks
# ------------------------------------------------------------------------------------------------
# What style LoRAs train: every attention projection (self and cross) and both FFN linears of each block.
_LORA_LAYERS = (*(f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo"), "ffn.0", "ffn.2")


def random_lora(dit: WanDiT, rank: int, seed: int = 0) -> LoraWeights:
    """A rank-`rank` LoRA on every attention and FFN linear of every block. Small up weights (as trained LoRAs have) keep the outputs in range; the work does not depend on them."""
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, (out_f, in_f) in linear_targets(dit).items():
        if name.startswith("blocks.") and name.split(".", 2)[2] in _LORA_LAYERS:
            down = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
            up = torch.randn(out_f, rank, generator=gen) * (0.01 / math.sqrt(rank))
            pairs[name] = LoraPair(down.to(torch.bfloat16), up.to(torch.bfloat16), alpha=float(rank))
    return LoraWeights(f"random rank-{rank} LoRA", pairs, ("wan",))


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------
def compile_seconds() -> dict[str, float]:
    """Seconds torch.compile has spent in this process so far, by phase: dynamo's own timings, every thread
    together (empty where this torch keeps none). The phases nest: Dynamo's whole compile of a frame holds
    its graph capture, AOT autograd and Inductor's compile or cache load."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    return {key: float(sum(times)) for key, times in list(compilation_time_metrics.items())}


def compile_seconds_since(before: dict[str, float], top: int = 6) -> dict[str, float]:
    """The `top` phases that grew most since `before` (a `compile_seconds()`), in seconds, largest first."""
    grown = {k: v - before.get(k, 0.0) for k, v in compile_seconds().items()}
    ranked = sorted(((v, k) for k, v in grown.items() if v > 0), reverse=True)[:top]
    return {k: round(v, 3) for v, k in ranked}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Dense bf16 matmul throughput on random data (the same-machine ceiling the DiT is compared to)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1000) / 1e12


def dit_flops(cfg: WanConfig, lanes: int, query_tokens: int, key_tokens: int) -> float:
    d, f, T = cfg.dim, cfg.ffn_dim, cfg.text_len
    per_token_layer = 2 * (6 * d * d + 2 * d * f + 2 * T * d)  # 12d² + 4df + 4Td
    attention = 4 * key_tokens * d
    embed_head = 2 * (cfg.in_dim * 4 * d + d * cfg.out_dim * 4)
    return lanes * query_tokens * (cfg.num_layers * (per_token_layer + attention) + embed_head)


def vace_flops(cfg: WanConfig, blocks: int, query_tokens: int) -> float:
    """The VACE hints of one DiT call at one lane: the context's patch embedding, before_proj, and per VACE
    block a Wan block (self-attention over the chunk alone, its keys padded to a multiple of 128 as Scope
    pads them) plus after_proj."""
    from wanstream.models.vace import PAD_MULTIPLE, VACE_IN_DIM

    d, f, T = cfg.dim, cfg.ffn_dim, cfg.text_len
    keys = query_tokens + (-query_tokens) % PAD_MULTIPLE
    block = 2 * (6 * d * d + 2 * d * f + 2 * T * d) + 4 * keys * d + 2 * d * d
    embed = 2 * VACE_IN_DIM * math.prod(cfg.patch_size) * d + 2 * d * d
    return query_tokens * (blocks * block + embed)


@dataclass
class Result:
    config: str
    fps: float
    chunk_ms_p50: float
    chunk_ms_p90: float
    encode_ms_p50: float
    dit_ms_p50: float
    decode_ms_p50: float
    ttff_ms: float
    first_chunk_cold_ms: float
    peak_mem_gib: float
    dit_tflops: float
    dit_fraction_of_matmul_peak: float
    chunks_measured: int
    chunk_ms_max: float = float("nan")
    first_frame_at: float = float("nan")  # wall-clock time the first output frame reached the CPU
    vace_encode_ms_p50: float = float("nan")  # codecs vace: the control frames' VAE encodes and assembly
    extra: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()  # as the server's engine thread runs sessions: compiled code is specialised on it
def bench_config(
    components: Components,
    cfg: BenchConfig,
    *,
    chunks: int = 30,
    warm_chunks: int = 8,
    graphs: bool = True,
    matmul_peak: float = float("nan"),
    loras: tuple[LoraSpec, ...] = (),
    label: str = "",
) -> Result:
    """One configuration's figures; `loras` run on top (named `cfg.name + label` in the results)."""
    device = components.device
    settings = cfg.settings()
    if loras:
        settings = StreamSettings.model_validate({**settings.model_dump(), "loras": loras})
    release_device_memory(device)  # the previous config's cache blocks and graph pools: not this one's peak
    models_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    session = StreamSession(components, settings, output="uint8")
    if device.type == "cuda":
        session.denoiser.use_cuda_graphs(graphs)
    push = _chunk_driver(session, cfg)
    if components.text_encoder is not None:
        session.set_prompts(long_prompt(0))
    else:
        text = torch.randn(
            1, 512 if components.dit.config.text_len == 512 else 16, components.dit.config.text_dim
        )
        session.set_prompt_embeddings(text.to(device, components.dtype))
    timer = StageTimer(device)
    session.stage_timer = StageTimer(device, wall=True)  # the first chunk: where start-up time goes
    # Stream batch outputs its first steady chunk N-1 chunks late: the decoder starts compiling only then.
    lag = len(settings.denoising_steps) - 1 if cfg.batching == "stream" else 0
    warm_chunks = max(warm_chunks, lag + 2)
    total = 5 + 4 * (warm_chunks + chunks)
    frames = (torch.rand(total, cfg.height, cfg.width, 3) * 255).to(torch.uint8)
    if device.type == "cuda":
        frames = frames.pin_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(block: torch.Tensor) -> int:
        out = push(block)
        return int(out.cpu().shape[0])  # materialise on the CPU: the honest end of a chunk

    compiled_before = compile_seconds()
    start = time.perf_counter()
    run(frames[:5])
    first_frame_at = time.time()
    first_chunk_cold = (time.perf_counter() - start) * 1000
    first_chunk_stages = _stage_totals(session.stage_timer)
    # Where a warm-cache start goes (issue 16: host-bound): compiling or loading compiled code, on any thread.
    first_chunk_compiles = compile_seconds_since(compiled_before)
    session.stage_timer = timer
    pos = 5
    for _ in range(warm_chunks):
        run(frames[pos : pos + 4])
        pos += 4
    vae = components.wan_vae
    if vae is not None and hasattr(vae, "wait_compiled") and not vae.wait_compiled(timeout=600):
        raise RuntimeError("the VAE's background compile did not finish in 10 minutes")
    run(frames[pos - 4 : pos])  # one chunk on the compiled VAE before the window (graphs, autotune)
    synchronize(device)
    timer.take_ms()
    chunk_ms, produced = [], 0
    window_start = time.perf_counter()
    for _ in range(chunks):
        t0 = time.perf_counter()
        produced += run(frames[pos : pos + 4])
        chunk_ms.append((time.perf_counter() - t0) * 1000)
        pos += 4
    window = time.perf_counter() - window_start
    synchronize(device)
    stages = timer.take_ms()
    extra: dict[str, Any] = {}
    if components.text_encoder is not None:  # inside the peak: the text encoder's visit counts
        extra["prompt_change"] = measure_prompt_change(session, frames[pos - 4 : pos], chunk_ms, push)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    extra["memory"] = memory_parts(session, models_bytes)
    if loras:  # what a live scale change costs: a re-merge, or a copy into the adapters' scales
        manager = lora_manager(components)
        halved = [lo.model_copy(update={"scale": lo.scale / 2}) for lo in loras]
        synchronize(device)
        t0 = time.perf_counter()
        manager.apply(halved, settings.lora_mode)
        synchronize(device)
        extra["lora_rescale_ms"] = (time.perf_counter() - t0) * 1000
        manager.apply(loras, settings.lora_mode)
    if session.denoiser.graphs is not None:
        extra["cuda_graphs"] = asdict(session.denoiser.graphs.stats)
    # Time to first frame on a fresh stream, compile caches warm.
    session.reset()
    synchronize(device)
    t0 = time.perf_counter()
    run(frames[:5])
    ttff = (time.perf_counter() - t0) * 1000
    dit_cfg = components.dit.config
    lanes = settings.denoising_steps.__len__() if cfg.batching == "stream" else 1
    L = settings.frame_tokens
    per_chunk_flops = (
        dit_flops(dit_cfg, lanes, L, L * settings.kv_cache_frames)
        if cfg.batching == "stream"
        else session.denoiser.passes_per_chunk * dit_flops(dit_cfg, 1, L, L * settings.kv_cache_frames)
    )
    vace = components.vace if session.conditioner is not None else None
    if vace is not None:  # the hints of every step (not of the t = 0 cache pass)
        per_chunk_flops += cfg.steps * vace_flops(dit_cfg, len(vace.vace_blocks), L)  # type: ignore[arg-type]
    dit_p50 = percentile(stages.get("dit", [math.nan]), 0.5)
    tflops = per_chunk_flops / (dit_p50 / 1000) / 1e12
    return Result(
        config=cfg.name + label,
        fps=produced / window,
        chunk_ms_p50=percentile(chunk_ms or [math.nan], 0.5),
        chunk_ms_p90=percentile(chunk_ms or [math.nan], 0.9),
        encode_ms_p50=percentile(stages.get("encode", [math.nan]), 0.5),
        dit_ms_p50=dit_p50,
        decode_ms_p50=percentile(stages.get("decode", [math.nan]), 0.5),
        ttff_ms=ttff,
        first_chunk_cold_ms=first_chunk_cold,
        peak_mem_gib=peak,
        dit_tflops=tflops,
        dit_fraction_of_matmul_peak=tflops / matmul_peak if matmul_peak == matmul_peak else float("nan"),
        chunks_measured=chunks,
        chunk_ms_max=max(chunk_ms),
        first_frame_at=first_frame_at,
        vace_encode_ms_p50=percentile(stages.get("vace_encode", [math.nan]), 0.5),
        extra={
            "first_chunk_stage_ms": first_chunk_stages,
            "first_chunk_compile_s": first_chunk_compiles,
            **extra,
        },
    )


def _chunk_driver(session: StreamSession, cfg: BenchConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a config turns input frames into output: `session.push` (video), or for the text-mode codecs
    one generated chunk per block — with VACE (codecs vace) the block is that chunk's control video."""
    if cfg.codecs == "vace":
        from wanstream.engine.vace import VaceConditioner

        cond = VaceConditioner(session)  # the components' VACE module, the Wan VAE as its encoder
        session.attach(cond)
        return cond.push
    if cfg.text_mode:
        return lambda block: session.generate(1)
    return session.push


PROMPT_WORDS = [
    "a",
    "watercolor",
    "painting",
    "of",
    "a",
    "neon",
    "city",
    "at",
    "night",
    "with",
    "rain",
    "and",
    "glowing",
    "golden",
    "light",
]


def long_prompt(seed: int) -> str:
    """A prompt that fills the encoder's 512 tokens with the demo tokenizer (the worst case: the encoder
    runs over the real tokens only, so shorter prompts cost less)."""
    words = PROMPT_WORDS[seed % len(PROMPT_WORDS) :] + PROMPT_WORDS[: seed % len(PROMPT_WORDS)]
    return " ".join(words * 40)


def measure_prompt_change(
    session: StreamSession,
    block: torch.Tensor,
    chunk_ms: list[float],
    push: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A new prompt (never seen: encoded now) → output frames made under it, on the CPU: the encode (for a
    "host" encoder, its copy to the device included), then chunks. The stream keeps its KV cache (a
    refresh, not a cut). `to_first_frame_ms`: the first chunk out after the change (in stream batch, its
    last step ran under the new prompt); `to_fully_conditioned_ms`: the first chunk whose every step did."""
    device = session.components.device
    prompt = long_prompt(1)  # the stream started on long_prompt(0): this one is not in its cache
    tokens = int(session.components.text_encoder.tokenize([prompt]).lengths[0])  # type: ignore[union-attr]
    lanes = session.denoiser.cache.config.lanes
    synchronize(device)
    t0 = time.perf_counter()
    session.set_prompts(prompt, switch="refresh")
    synchronize(device)
    encode_ms = (time.perf_counter() - t0) * 1000
    outputs: list[float] = []
    for _ in range(lanes + 4):
        if int((push or session.push)(block).cpu().shape[0]):
            outputs.append((time.perf_counter() - t0) * 1000)
            if len(outputs) == lanes:
                break
    return {
        "tokens": tokens,
        "encode_ms": round(encode_ms, 2),
        "to_first_frame_ms": round(outputs[0], 2) if outputs else float("nan"),
        "to_fully_conditioned_ms": round(outputs[-1], 2) if len(outputs) == lanes else float("nan"),
        "steady_chunk_ms_p50": round(percentile(chunk_ms or [math.nan], 0.5), 2),
    }


def memory_parts(session: StreamSession, models_bytes: int) -> dict[str, Any]:
    """Where the device memory went (GiB): the networks before the stream, the KV cache (its buffers), the
    CUDA-graph pools (segments outside the default pool, from the allocator's snapshot), the text
    encoder (device copy, or host copy when parked), peaks allocated and reserved."""
    c = session.components
    cache = session.denoiser.cache
    kv = sum(b.numel() * b.element_size() for b in cache.buffers())
    out: dict[str, Any] = {"kv_cache_gib": kv / 2**30}
    enc = c.text_encoder
    if enc is not None:
        from wanstream.models.offload import HostTextEncoder

        model = enc.model  # type: ignore[union-attr]
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        key = "text_encoder_host_gib" if isinstance(enc, HostTextEncoder) else "text_encoder_gib"
        out[key] = size / 2**30
    if c.device.type != "cuda":
        return out
    out["models_gib"] = models_bytes / 2**30
    out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(c.device) / 2**30
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(c.device) / 2**30
    out["graph_pools_gib"] = graph_pool_bytes() / 2**30
    return out


def graph_pool_bytes() -> int:
    """Reserved bytes of the CUDA-graph private pools (segments whose pool id is not the default (0, 0));
    NaN-free: 0 when the allocator's snapshot is not available."""
    try:
        segments = torch.cuda.memory_snapshot()
    except (RuntimeError, AttributeError):
        return 0
    return sum(
        int(s.get("total_size", 0)) for s in segments if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)
    )


def print_table(results: list[Result], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="wanstream bench (steady state)")
    vace = any(not math.isnan(r.vace_encode_ms_p50) for r in results)
    for col in (
        "config",
        "FPS",
        "chunk p50/p90 ms",
        "enc / DiT / dec ms",
        *(["VACE enc ms"] if vace else []),
        "TTFF ms",
        "peak GiB",
        "DiT TFLOP/s",
    ):
        table.add_column(col, justify="right" if col != "config" else "left")
    for r in results:
        table.add_row(
            r.config,
            f"{r.fps:.2f}",
            f"{r.chunk_ms_p50:.1f} / {r.chunk_ms_p90:.1f}",
            f"{r.encode_ms_p50:.1f} / {r.dit_ms_p50:.1f} / {r.decode_ms_p50:.1f}",
            *([f"{r.vace_encode_ms_p50:.1f}"] if vace else []),
            f"{r.ttff_ms:.0f}",
            f"{r.peak_mem_gib:.1f}",
            f"{r.dit_tflops:.0f} ({100 * r.dit_fraction_of_matmul_peak:.0f}%)",
        )
    (console or Console()).print(table)


def run_bench(
    configs: list[BenchConfig],
    *,
    device: torch.device,
    tiny: bool = False,
    chunks: int = 30,
    warm_chunks: int = 8,
    compile: bool = True,
    graphs: bool = True,
    vae_layout: str = "compiled",
    json_path: str | None = None,
    lora_rank: int | None = None,
    lora_modes: tuple[str, ...] = ("none", *get_args(LoraMode)),
    live_changes: bool = False,
    precision: str = "bf16",
    text_encoder: str | None = None,
    memory_limit_gib: float | None = None,
    write_estimates: str | None = None,
    reproducible: bool = False,
) -> list[Result]:
    """`text_encoder`: also build a random umT5 placed so ("gpu", "fp8", "host", "auto"), measured in the
    peak memory, with the prompt-change latency. `memory_limit_gib`: cap this process's GPU memory
    before anything is allocated (a run that completes proves the fit). `write_estimates`: add the
    results to that estimates table (docs/memory.md)."""
    from rich.console import Console

    console = Console()
    process_start = _process_start_time()
    if memory_limit_gib is not None:
        limit_memory(device, memory_limit_gib, console)

    def mark(label: str) -> None:  # where start-up time goes
        console.print(f"[dim][{time.time() - process_start:6.1f} s] {label}[/dim]")

    mark("modules imported")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not reproducible  # as Components.optimize sets it
        torch.backends.cuda.matmul.allow_tf32 = True
    if live_changes and configs[0].text_mode:
        raise ValueError(
            f"--live-changes runs the first config's video stream; {configs[0].name} is text mode"
        )
    # The VACE module only when a config uses it: its weights (1.5 GB at full size) are in every config's peak.
    with_vace = any(cfg.codecs == "vace" for cfg in configs)
    components = random_components(
        device, dtype, tiny=tiny, precision=precision, text_encoder=text_encoder, vace=with_vace
    )
    mark("networks built")
    console.print(f"[bold]{components.label}[/bold] on {device}")
    if compile and device.type == "cuda":
        components.optimize(vae=vae_layout == "compiled", reproducible=reproducible)
    if device.type == "cuda" and vae_layout == "channels_last":
        components.wan_vae.optimize(channels_last=True, compile=False)  # type: ignore[union-attr]
    mark("optimised")
    variants: list[tuple[str, tuple[LoraSpec, ...]]] = [("", ())]
    if lora_rank:
        weights = random_lora(components.dit, lora_rank)
        lora_manager(components).register("bench-lora", weights)
        console.print(weights.describe())
        variants = [
            ("", ()) if mode == "none" else (f"+lora{lora_rank}-{mode}", (_bench_lora(mode),))
            for mode in lora_modes
        ]
    peak = matmul_tflops(device)
    if peak == peak:
        console.print(f"bf16 matmul (8192³, random data): {peak:.0f} TFLOP/s")
    results = []
    runs = [(cfg, label, loras) for cfg in configs for label, loras in variants]
    for i, (cfg, label, loras) in enumerate(runs):
        result = bench_config(
            components,
            cfg,
            chunks=chunks,
            warm_chunks=warm_chunks,
            graphs=graphs,
            matmul_peak=peak,
            loras=loras,
            label=label,
        )
        if i == 0:  # process start → first output frame on the CPU (model build and compile included)
            result.extra["cold_start_s"] = result.first_frame_at - process_start
        results.append(result)
        rescale = result.extra.get("lora_rescale_ms")
        console.print(
            f"{result.config}: {result.fps:.2f} FPS, chunk p50 {result.chunk_ms_p50:.1f} max {result.chunk_ms_max:.1f} ms, "
            f"enc/DiT/dec {result.encode_ms_p50:.1f}/{result.dit_ms_p50:.1f}/{result.decode_ms_p50:.1f} ms, "
            + (
                f"VACE encode {result.vace_encode_ms_p50:.1f} ms, "
                if not math.isnan(result.vace_encode_ms_p50)
                else ""
            )
            + f"TTFF {result.ttff_ms:.0f} ms, first chunk cold {result.first_chunk_cold_ms / 1000:.1f} s, "
            f"peak {result.peak_mem_gib:.1f} GiB, DiT {result.dit_tflops:.0f} TFLOP/s"
            + (f", cold start {result.extra['cold_start_s']:.1f} s" if "cold_start_s" in result.extra else "")
            + (f", LoRA scale change {rescale:.1f} ms" if rescale is not None else "")
        )
        console.print(describe_extras(result))
    print_table(results, console)
    live = bench_live_changes(components, configs[0], console) if live_changes else None
    fallbacks = FALLBACKS.snapshot()
    console.print(
        f"optimisation fallbacks: {sum(fallbacks['counts'].values())}"
        + (f" {fallbacks['counts']} — last: {fallbacks['last']}" if fallbacks["counts"] else "")
    )
    if json_path:
        payload = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "matmul_tflops": peak,
            "compile": compile,
            "cuda_graphs": graphs,
            "cudnn_benchmark": not reproducible,
            "vae_layout": vae_layout,
            "weights": components.label,
            "precision": components.precision,
            "float8_gemms": computes_in_float8(components.dit),  # precision fp8 on a GPU that has them
            "text_encoder": components.text_placement,
            "memory_limit_gib": memory_limit_gib,
            "fallbacks": FALLBACKS.snapshot(),
            "results": [asdict(r) for r in results],
            "live_changes": live,
        }
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
    if write_estimates:
        rows = estimate_rows(components, configs, results, variants_per_config=len(variants))
        if rows:
            from pathlib import Path

            from wanstream.engine.estimate import write_rows

            write_rows(Path(write_estimates), rows)
            console.print(f"estimates: {len(rows)} row(s) written to {write_estimates}")
        else:
            console.print("estimates: nothing written (measured on the CPU: the table is per GPU)")
    return results


def limit_memory(device: torch.device, limit_gib: float, console: Any = None) -> float:
    """Cap this process's share of the GPU at `limit_gib` (torch's per-process memory fraction), before
    anything is allocated: a run that completes under it fits a card of that size. Returns the fraction."""
    if device.type != "cuda":
        if console is not None:
            console.print(f"memory limit {limit_gib:g} GiB: ignored on the CPU")
        return float("nan")
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" has none
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, limit_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    if console is not None:
        console.print(f"memory limit: {limit_gib:g} GiB of {total / 2**30:.1f} GiB (fraction {fraction:.3f})")
    return fraction


def describe_extras(result: Result) -> str:
    """The memory split and the prompt-change latency of one result, as one line."""
    mem = result.extra.get("memory", {})
    parts = ", ".join(f"{k.removesuffix('_gib')} {v:.2f}" for k, v in mem.items())
    line = f"  memory GiB: {parts}"
    if compiles := result.extra.get("first_chunk_compile_s"):  # nested phases: the largest holds the rest
        phases = ", ".join(f"{k} {v:.1f}" for k, v in compiles.items())
        line += f"\n  first chunk, seconds compiling or loading compiled code (any thread): {phases}"
    change = result.extra.get("prompt_change")
    if change:
        line += (
            f"\n  prompt change ({change['tokens']} tokens): encode {change['encode_ms']:.0f} ms, first frame "
            f"{change['to_first_frame_ms']:.0f} ms, fully conditioned {change['to_fully_conditioned_ms']:.0f} ms"
        )
    return line


def estimate_rows(
    components: Components, configs: list[BenchConfig], results: list[Result], variants_per_config: int
) -> list:
    """Rows for the estimates table: one per config (its first variant, without LoRA), GPU runs only; the
    text-mode codecs (vace, text) are not rows: the table is keyed by the codecs of a video stream."""
    from wanstream.engine.estimate import Row, measured_note

    device = components.device
    if device.type != "cuda":
        return []
    gpu = torch.cuda.get_device_name(device)
    rows = []
    for cfg, result in zip(configs, results[::variants_per_config]):
        if cfg.text_mode:
            continue
        mem = result.extra["memory"]
        rows.append(
            Row(
                gpu=gpu,
                height=cfg.height,
                width=cfg.width,
                steps=cfg.steps,
                codecs=cfg.codecs,
                batching=cfg.batching,
                precision=components.precision,
                text_encoder=components.text_placement,
                peak_gib=round(mem["peak_reserved_gib"], 3),
                models_gib=round(mem["models_gib"], 3),
                fps=round(result.fps, 3),
                measured=measured_note(),
            )
        )
    return rows


@torch.inference_mode()  # as the server's engine thread runs sessions: compiled code is specialised on it
def bench_live_changes(components: Components, cfg: BenchConfig, console: Any = None) -> dict[str, Any]:
    """One stream through what a performer does live, each phase timed per chunk (wall, output on the CPU):
    steady chunks, a prompt change, a hard cut (reset) with its time to first frame, and denoising steps
    changed live 2 → 3 → 1 (a different lane count: new shapes, new graphs). Checks that every phase keeps
    producing frames; the figures show what each change costs."""
    device = components.device
    session = StreamSession(components, cfg.settings(), output="uint8")
    text_dim, text_len = components.dit.config.text_dim, components.dit.config.text_len
    frames = (torch.rand(5 + 4 * 12, cfg.height, cfg.width, 3) * 255).to(torch.uint8)

    def prompt(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, text_len, text_dim, generator=g).to(device, components.dtype)

    # Each chunk's time per stage (CUDA events: a host that blocks inside a stage shows there too) and its
    # calls that ran eager code: what a slow chunk after a change spent its time on.
    timer = StageTimer(device)
    session.stage_timer = timer

    def chunks(n: int, first: bool = False) -> dict[str, Any]:
        times, stages, eager, made = [], [], [], 0
        before = COMPILES.snapshot()
        for i in range(n):
            block = frames[:5] if first and i == 0 else frames[5 + 4 * (i % 12) : 9 + 4 * (i % 12)]
            eager_before = COMPILES.eager_runs()
            timer.marks.clear()  # stages run outside a push (a steps change decodes what is in flight) are not its
            t0 = time.perf_counter()
            made += int(session.push(block).cpu().shape[0])
            times.append(round((time.perf_counter() - t0) * 1000, 1))
            synchronize(device)  # the output's copy waited for the chunk's last stage; this, for every stage
            stages.append(_stage_totals(timer))
            eager.append(COMPILES.eager_runs() - eager_before)
        after = COMPILES.snapshot()
        phase: dict[str, Any] = {"chunk_ms": times, "stage_ms": stages, "eager_calls": eager, "frames": made}
        # New shapes compiled off the engine thread in this phase (fastpath.COMPILES), and whether one still was
        # at its end; the phase's graphs (a steps change builds a new denoiser, so these are its own).
        phase["background_compiles"] = {k: after[k] - before[k] for k in before if k != "pending"}
        phase["compiling_at_end"] = after["pending"] > 0
        if session.denoiser.graphs is not None:
            phase["cuda_graphs"] = asdict(session.denoiser.graphs.stats)
        return phase

    phases: dict[str, Any] = {}
    session.set_prompt_embeddings(prompt(1))
    phases["start"] = chunks(12, first=True)
    session.set_prompt_embeddings(prompt(2))
    phases["prompt_change"] = chunks(6)
    session.reset()
    phases["hard_cut"] = chunks(6, first=True)  # its first chunk's time is the TTFF after a reset
    for steps in ((700, 500), (700, 500, 400), (700,)):
        session.update({"steps": list(steps)})
        phases[f"steps_{len(steps)}"] = chunks(10)
    synchronize(device)
    steady = percentile(phases["start"]["chunk_ms"][4:], 0.5)
    summary = {
        "config": cfg.name,
        "steady_chunk_ms": steady,
        "ttff_after_reset_ms": phases["hard_cut"]["chunk_ms"][0],
        "worst_chunk_ms": {k: max(v["chunk_ms"]) for k, v in phases.items()},
        "worst_chunk_stages": {k: _worst(v) for k, v in phases.items()},
        "all_phases_produced_frames": all(v["frames"] > 0 for v in phases.values()),
        "background_compiles": COMPILES.snapshot(),
        "phases": phases,
    }
    if session.denoiser.graphs is not None:
        summary["cuda_graphs"] = asdict(session.denoiser.graphs.stats)
    if console is not None:
        console.print(
            f"live changes ({cfg.name}): steady {steady:.1f} ms/chunk, TTFF after reset "
            f"{summary['ttff_after_reset_ms']:.0f} ms, worst per phase {summary['worst_chunk_ms']} "
            f"(its stages ms and eager calls: {summary['worst_chunk_stages']}), "
            f"frames in every phase: {summary['all_phases_produced_frames']}, background compiles "
            f"{summary['background_compiles']}"
        )
    return summary


def _stage_totals(timer: StageTimer) -> dict[str, float]:
    """Milliseconds per stage since the timer was last read (after a synchronize), summed, then forgotten."""
    return {k: round(sum(v), 1) for k, v in timer.take_ms().items()}


def _worst(phase: dict[str, Any]) -> dict[str, Any]:
    """The phase's slowest chunk: its stage times and its calls that ran eager code."""
    i = max(range(len(phase["chunk_ms"])), key=phase["chunk_ms"].__getitem__)
    return {**phase["stage_ms"][i], "eager_calls": phase["eager_calls"][i]}


def _bench_lora(mode: str) -> LoraSpec:
    if mode not in get_args(LoraMode):
        raise ValueError(f"LoRA mode {mode!r}: use none, {' or '.join(get_args(LoraMode))}")
    return LoraSpec(path="bench-lora", scale=1.0, mode=mode)  # type: ignore[arg-type]


def _process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc), for cold-start figures."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


__all__ = ["DEFAULT_CONFIGS", "DEFAULT_STEPS", "BenchConfig", "Result", "run_bench"]
