"""`wanstream bench --gpus N`: one stream over N GPUs against the same configurations on one GPU.

Full-size random weights on every rank (the compute is the real model's). Per configuration:
* steady-state FPS of the ring (frames through it per second after warm-up, at the pace its pushes go
  once it is full, see `_window`; the ring's output lags its input by about N·R chunks, so the warm-up is
  at least that long);
* the same configuration on one GPU (the single-process engine, `bench/single.py`) and the scaling
  efficiency FPS_N / (N · FPS_1);
* chunk latency (push to frames on the CPU) p50/p90 and time to first frame on a fresh stream;
* each rank's median DiT and total time per batch and its peak memory (what the rebalancer reads);
* with `rebalance`, the same after the one-shot block rebalancer has moved blocks.

Configurations are `wanstream bench`'s (mode,HxW,steps,codecs). A ring runs stream batch; `nobatch`
configurations with one step run as the same single lane, with more steps they are skipped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from wanstream.bench.single import BenchConfig, bench_config, matmul_tflops, synchronize
from wanstream.engine.measure import percentile
from wanstream.engine.random_weights import random_components
from wanstream.parallel.launch import ModelSource, Ring
from wanstream.parallel.rebalance import measure

# The measurement: both sizes, 1-4 steps, the Wan VAE both ways.
RING_CONFIGS = ";".join(
    f"batch,{size},{steps},wan" for size in ("480x832", "512x512") for steps in (1, 2, 3, 4)
)


@dataclass
class RingResult:
    config: str
    gpus: int
    fps: float
    fps_one_gpu: float
    efficiency: float  # fps / (gpus · fps_one_gpu)
    chunk_ms_p50: float
    chunk_ms_p90: float
    ttff_ms: float
    layout: list[tuple[int, int]]
    ranks: list[list[float]]  # [rank, blocks, DiT ms, total ms, batches, peak GiB]
    chunks_measured: int
    rebalanced: dict[str, Any] = field(default_factory=dict)  # fps, layout, ranks after the rebalancer


class _Feed:
    """Input chunks for a ring: the stream's first 5 frames, then 4 at a time, cycling over a pool (the
    content does not matter for timing, and a window may need more chunks than planned, see `_window`)."""

    def __init__(self, frames: torch.Tensor) -> None:
        self.frames, self.pos = frames, 5

    def first(self) -> torch.Tensor:
        return self.frames[:5]

    def next(self) -> torch.Tensor:
        if self.pos + 4 > self.frames.shape[0]:
            self.pos = 5
        chunk = self.frames[self.pos : self.pos + 4]
        self.pos += 4
        return chunk


def _window(session: Any, feed: _Feed, chunks: int, most: int) -> tuple[float, list[float]]:
    """Frames per second through the full ring: `chunks` pushes of 4 frames, timed.

    Each push waits for the batch that left R pushes earlier to come back, so once the ring is full the
    pushes go at its pace (its slowest rank's, decoding included). The frames a push returns are only those
    that have arrived (never waited for), so counting them over a short window measures arrival jitter: a
    rank late for three pushes read 0.00 FPS on a busy CI machine, a backlog arriving at once reads too
    much. The window must still see frames come out: without any it goes on until some do, at most `most`
    pushes (then it is an error)."""
    chunk_ms: list[float] = []
    out = 0
    start = time.perf_counter()
    while len(chunk_ms) < chunks or out == 0:
        if len(chunk_ms) == most:
            raise RuntimeError(f"the ring gave no frames in {most} chunks")
        t0 = time.perf_counter()
        out += int(session.push(feed.next()).cpu().shape[0])
        chunk_ms.append((time.perf_counter() - t0) * 1000)
    return 4 * len(chunk_ms) / (time.perf_counter() - start), chunk_ms


def bench_ring_config(
    ring: Ring, cfg: BenchConfig, *, chunks: int, warm_chunks: int, rebalance: bool
) -> RingResult:
    settings = cfg.settings()
    if settings.batching != "stream":
        if len(settings.denoising_steps) > 1:
            raise ValueError(f"{cfg.name}: a ring runs stream batch (nobatch only with one step)")
        settings = settings.model_copy(update={"batching": "stream"})  # one step: the same single lane
    c = ring.components
    lag = len(settings.denoising_steps) * ring.world
    warm = max(warm_chunks, lag + 2)
    session = ring.session(settings)
    text_len = 512 if c.dit.config.text_len == 512 else 16
    session.set_prompt_embeddings(torch.randn(1, text_len, c.dit.config.text_dim).to(c.device, c.dtype))
    frames = (torch.rand(5 + 4 * (warm + chunks + 1), cfg.height, cfg.width, 3) * 255).to(torch.uint8)
    if c.device.type == "cuda":
        frames = frames.pin_memory()
    feed = _Feed(frames)
    most = 4 * chunks + 2 * lag + 8  # far beyond any steady lag: a ring that gives nothing is an error
    session.push(feed.first())
    for _ in range(warm):
        session.push(feed.next())
    vae = c.wan_vae
    if vae is not None and hasattr(vae, "wait_compiled"):
        vae.wait_compiled(timeout=600)  # rank 0's encoder (the last rank's decoder warms in the window)
    fps, chunk_ms = _window(session, feed, chunks, most)
    ranks = measure(ring)
    result = RingResult(
        config=cfg.name,
        gpus=ring.world,
        fps=fps,
        fps_one_gpu=float("nan"),
        efficiency=float("nan"),
        chunk_ms_p50=percentile(chunk_ms or [math.nan], 0.5),
        chunk_ms_p90=percentile(chunk_ms or [math.nan], 0.9),
        ttff_ms=float("nan"),
        layout=list(ring.layout),
        ranks=ranks,
        chunks_measured=len(chunk_ms),  # pushes in the window (more when no frame came out in time)
    )
    if rebalance:
        before = list(ring.layout)
        layout = ring.rebalance()
        for _ in range(warm):
            session.push(feed.next())
        fps2, chunk_ms2 = _window(session, feed, chunks, most)
        result.rebalanced = {
            "fps": fps2,
            "chunk_ms_p50": percentile(chunk_ms2 or [math.nan], 0.5),
            "layout": layout,
            "ranks": measure(ring),
        }
        ring.rebalance(before)  # the next configuration starts from the default split again
    session.reset()
    synchronize(c.device)
    t0 = time.perf_counter()
    session.push(feed.first()).cpu()
    result.ttff_ms = (time.perf_counter() - t0) * 1000
    session.flush()
    return result


def run_parallel_bench(
    configs: list[BenchConfig],
    *,
    gpus: int,
    device: str = "cuda",
    tiny: bool = False,
    chunks: int = 30,
    warm_chunks: int = 8,
    compile: bool = True,
    baseline: bool = True,
    rebalance: bool = False,
    json_path: str | None = None,
) -> list[RingResult]:
    from rich.console import Console

    console = Console()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    runnable = [c for c in configs if c.batching == "stream" or c.steps == 1]
    for cfg in configs:
        if cfg not in runnable:
            console.print(
                f"{cfg.name}: skipped (a ring runs stream batch; nobatch with several steps is one GPU)"
            )
    configs = runnable
    one_gpu: dict[str, float] = {}
    if baseline:  # the single-process engine on GPU 0 first, freed before the ring starts
        components = random_components(
            torch.device(device, 0) if device == "cuda" else torch.device("cpu"), dtype, tiny
        )
        if compile and device == "cuda":
            components.optimize()
        for cfg in configs:
            one_gpu[cfg.name] = bench_config(components, cfg, chunks=chunks, warm_chunks=warm_chunks).fps
            console.print(f"1 GPU  {cfg.name}: {one_gpu[cfg.name]:.2f} FPS")
        del components
        if device == "cuda":
            torch.cuda.empty_cache()
    source = ModelSource(
        "random", dtype="bfloat16" if device == "cuda" else "float32", tiny=tiny, optimize=compile
    )
    results = []
    with Ring.start(source, gpus, device=device) as ring:
        console.print(f"[bold]{ring.label}[/bold]")
        for cfg in configs:
            result = bench_ring_config(ring, cfg, chunks=chunks, warm_chunks=warm_chunks, rebalance=rebalance)
            base = one_gpu.get(cfg.name, float("nan"))
            result.fps_one_gpu, result.efficiency = base, result.fps / (gpus * base) if base else float("nan")
            results.append(result)
            per_rank = ", ".join(f"r{int(r[0])} {int(r[1])}b {r[2]:.1f}/{r[3]:.1f} ms" for r in result.ranks)
            line = (
                f"{gpus} GPUs {cfg.name}: {result.fps:.2f} FPS (1 GPU {base:.2f}, efficiency "
                f"{100 * result.efficiency:.0f}%), chunk p50 {result.chunk_ms_p50:.1f} ms, TTFF "
                f"{result.ttff_ms:.0f} ms; DiT/total per batch: {per_rank}"
            )
            if result.rebalanced:
                line += f"; rebalanced {result.rebalanced['layout']}: {result.rebalanced['fps']:.2f} FPS"
            console.print(line)
    _print_table(results, console)
    if json_path:
        payload = {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "gpus": gpus,
            "torch": torch.__version__,
            "matmul_tflops": matmul_tflops(torch.device(device, 0)) if device == "cuda" else float("nan"),
            "compile": compile,
            "results": [asdict(r) for r in results],
        }
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
    return results


def _print_table(results: list[RingResult], console: Any) -> None:
    from rich.table import Table

    table = Table(title="wanstream bench --gpus (steady state)")
    for col in (
        "config",
        "GPUs",
        "FPS",
        "1-GPU FPS",
        "efficiency",
        "chunk p50/p90 ms",
        "TTFF ms",
        "slowest rank",
    ):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        slowest = max(r.ranks, key=lambda row: row[3]) if r.ranks else None
        table.add_row(
            r.config,
            str(r.gpus),
            f"{r.fps:.2f}",
            f"{r.fps_one_gpu:.2f}",
            f"{100 * r.efficiency:.0f}%",
            f"{r.chunk_ms_p50:.1f} / {r.chunk_ms_p90:.1f}",
            f"{r.ttff_ms:.0f}",
            f"r{int(slowest[0])} {slowest[3]:.1f} ms" if slowest else "-",
        )
    console.print(table)


__all__ = ["RingResult", "bench_ring_config", "run_parallel_bench"]
