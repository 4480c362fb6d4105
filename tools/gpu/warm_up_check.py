"""`serve`'s warm-up on a GPU (engine/warm_up.py), with full-size random weights (the real model's compute):
how long the warm-up streams take, then what a client's first stream after them costs — time to first frame,
its first chunks, and the worst chunk after each live steps change — and whether anything compiled in that
stream (it should not: the warm-up compiled it). Run by `matrix.sh W`; writes one JSON.

    python3 tools/gpu/warm_up_check.py OUT.json [--steps-changes 1,3,4,2]
    python3 tools/gpu/warm_up_check.py /tmp/w.json --device cpu --tiny --height 32 --width 48   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

PROCESS_START = time.time()


def _timed_push(session, frames: torch.Tensor) -> float:
    start = time.perf_counter()
    session.push(frames).cpu()  # on the CPU: the honest end of a chunk
    return (time.perf_counter() - start) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps-changes", default="1,3,4,2", help="step counts changed to live, in order")
    p.add_argument("--chunks", type=int, default=8, help="chunks timed after the first and after each change")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the benchmark's tiny random networks (a smoke run)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    opts = p.parse_args()

    from wanstream import Pipeline
    from wanstream.engine.settings import DEFAULT_STEPS, StreamSettings
    from wanstream.engine.warm_up import lane_classes
    from wanstream.models.fastpath import COMPILES, FALLBACKS

    def dynamo_graphs() -> int:  # every graph dynamo compiled in this process, on any thread
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    cuda = opts.device == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else opts.device
    result: dict = {"argv": vars(opts) | {"out": str(opts.out)}, "device": device_name}
    pipe = Pipeline.random_weights(device=opts.device, tiny=opts.tiny)
    result["built_s"] = round(time.time() - PROCESS_START, 2)
    settings = StreamSettings(height=opts.height, width=opts.width)
    streams = lane_classes(settings)  # what `serve` warms up
    result["warm_up"] = []
    for s in streams:
        done = pipe.warm_up(s)
        result["warm_up"].append(
            {"steps": len(s.denoising_steps), "chunks": done.chunks, "s": round(done.seconds, 2)}
        )
    result["loaded_s"] = round(time.time() - PROCESS_START, 2)  # where `serve` would say "loaded"
    compiles_before, graphs_before = COMPILES.snapshot()["scheduled"], dynamo_graphs()

    timesteps = {1: (700,), 2: DEFAULT_STEPS, 3: (800, 600, 400), 4: (900, 700, 500, 300)}
    frames = (torch.rand(4, settings.height, settings.width, 3) * 255).to(torch.uint8)
    frames = frames.pin_memory() if cuda else frames
    with torch.inference_mode():  # as the server's engine thread
        session = pipe.session(settings, prompts="a fox in the snow, oil painting")
        first = torch.cat([frames, frames[:1]])
        result["ttff_ms"] = round(_timed_push(session, first), 1)  # 5 frames in → first chunk out
        result["chunks_ms"] = [round(_timed_push(session, frames), 1) for _ in range(opts.chunks)]
        result["steps_changes"] = []
        for count in (int(c) for c in opts.steps_changes.split(",")):
            session.update({"steps": timesteps[count]})
            times = [round(_timed_push(session, frames), 1) for _ in range(opts.chunks)]
            graphs = session.denoiser.graphs
            stats = asdict(graphs.stats) if graphs is not None else None
            result["steps_changes"].append(
                {"to": count, "chunks_ms": times, "worst_ms": max(times), "graphs": stats}
            )
        session.close()
    # Should both be 0: the warm-up compiled what this stream and its changes need.
    result["background_compiles_after_warm_up"] = COMPILES.snapshot()["scheduled"] - compiles_before
    result["dynamo_graphs_after_warm_up"] = dynamo_graphs() - graphs_before
    result["fallbacks"] = FALLBACKS.snapshot()
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    opts.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
