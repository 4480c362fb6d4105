"""Does the GPU have room to run two chunks' work at once? (issue 16 item 5, issue "Performance II")

A chunk is a chain — Wan VAE encode, the DiT call, Wan VAE decode — and runs one kernel after another. The
VAE's convs and the DiT's GEMMs / attention each fill the GPU on their own, but a pipelined session would run
one chunk's decode beside the next one's encode and DiT. Whether that can pay is measured here before it is
built: two sessions of the same settings on the same components, each on its own CUDA stream — driven from two
host threads, and from one thread that enqueues both chunks before waiting (no competition for the
interpreter) — against the same two sessions one chunk after the other. If the pair of chunks takes no less time
side by side than in turn, the GPU is already full and pipelining cannot help.

Usage (repo root, after `source tools/gpu/env.sh`):
    python3 tools/gpu/overlap_probe.py OUT.json [CONFIG ...]   (CONFIG as `bench --configs`; default
    batch,480x832,2,wan and batch,480x832,4,wan)
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import torch

from wanstream.bench.single import BenchConfig
from wanstream.engine.measure import percentile
from wanstream.engine.random_weights import random_components
from wanstream.engine.session import StreamSession


def new_session(components: Any, cfg: BenchConfig) -> StreamSession:
    session = StreamSession(components, cfg.settings(), output="uint8")
    session.denoiser.use_cuda_graphs(True)
    text = torch.randn(1, components.dit.config.text_len, components.dit.config.text_dim)
    session.set_prompt_embeddings(text.to(components.device, components.dtype))
    return session


def chunk(session: StreamSession, frames: torch.Tensor) -> None:
    session.push(frames).cpu()  # the honest end of a chunk: its frames on the host


def in_turn(sessions: list[StreamSession], frames: torch.Tensor, chunks: int) -> list[float]:
    """Each round: one chunk of every session, one after the other; ms per round."""
    times = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        for s in sessions:
            chunk(s, frames)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def side_by_side(sessions: list[StreamSession], frames: torch.Tensor, chunks: int) -> float:
    """Every session on its own thread and CUDA stream, `chunks` chunks each; ms per round (wall / chunks)."""
    barrier = threading.Barrier(len(sessions) + 1)
    errors: list[BaseException] = []

    def work(s: StreamSession) -> None:
        stream = torch.cuda.Stream()
        try:
            with torch.inference_mode(), torch.cuda.stream(stream):
                barrier.wait()
                for _ in range(chunks):
                    chunk(s, frames)
                stream.synchronize()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = (time.perf_counter() - t0) * 1000
    if errors:
        raise errors[0]
    return wall / chunks


def two_streams(sessions: list[StreamSession], frames: torch.Tensor, chunks: int) -> float:
    """One host thread: each round enqueues every session's chunk on its own CUDA stream, then waits for all —
    the GPU may overlap them while the host does not compete with itself for the interpreter; ms per round."""
    streams = [torch.cuda.Stream() for _ in sessions]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(chunks):
        outs = []
        for s, stream in zip(sessions, streams):
            with torch.cuda.stream(stream):
                outs.append(s.push(frames))
        for out, stream in zip(outs, streams):
            with torch.cuda.stream(stream):
                out.cpu()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / chunks


@torch.inference_mode()
def probe(components: Any, cfg: BenchConfig, chunks: int = 16) -> dict[str, Any]:
    a, b = new_session(components, cfg), new_session(components, cfg)
    first = (torch.rand(5, cfg.height, cfg.width, 3) * 255).to(torch.uint8).pin_memory()
    frames = first[:4]
    for s in (a, b):
        chunk(s, first)
        for _ in range(6):
            chunk(s, frames)
    vae = components.wan_vae
    if vae is not None and hasattr(vae, "wait_compiled"):
        vae.wait_compiled(timeout=600)
    in_turn([a, b], frames, 4)  # the compiled VAE's first calls, graph captures
    torch.cuda.synchronize()
    one = in_turn([a], frames, chunks)
    pair = in_turn([a, b], frames, chunks)
    both = [side_by_side([a, b], frames, chunks) for _ in range(2)]
    one_thread = [two_streams([a, b], frames, chunks) for _ in range(2)]
    result = {
        "config": cfg.name,
        "one_session_chunk_ms_p50": percentile(one, 0.5),
        "two_in_turn_round_ms_p50": percentile(pair, 0.5),
        "two_side_by_side_round_ms": both,
        "two_streams_one_thread_round_ms": one_thread,
        "graphs": [s.denoiser.graphs.stats.__dict__ if s.denoiser.graphs else None for s in (a, b)],
    }
    result["side_by_side_saves"] = 1 - min(both) / result["two_in_turn_round_ms_p50"]
    result["two_streams_one_thread_saves"] = 1 - min(one_thread) / result["two_in_turn_round_ms_p50"]
    for s in (a, b):
        s.close()
    return result


def main() -> None:
    out = sys.argv[1]
    names = sys.argv[2:] or ["batch,480x832,2,wan", "batch,480x832,4,wan"]
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    components = random_components(device, torch.bfloat16)
    components.optimize()
    results = []
    for name in names:
        t0 = time.time()
        try:
            results.append(probe(components, BenchConfig.parse(name)))
        except Exception as exc:  # the next config still runs; the error is in the JSON
            results.append({"config": name, "error": f"{type(exc).__name__}: {exc}"})
        results[-1]["seconds"] = time.time() - t0
        print(json.dumps(results[-1]), flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
