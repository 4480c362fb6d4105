"""On the GPU: a real CUDA out-of-memory ends only the stream that hit it (a clear message, its memory back),
and the next stream in the same process starts — under the same memory limit and after it is lifted.

The limit is `torch.cuda.set_per_process_memory_fraction`: the loaded (full-size, random) models plus a few GiB,
so a 960x1664 four-step stream cannot fit. Prints one JSON line (and writes it to argv[1] if given).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from wanstream.bench import random_components
from wanstream.engine.session import StreamOutOfMemory, StreamSession
from wanstream.engine.settings import StreamSettings


def stream(components, height: int, width: int, steps: tuple[int, ...], batching: str, chunks: int) -> int:
    session = StreamSession(
        components, StreamSettings(height=height, width=width, steps=steps, batching=batching), output="uint8"
    )
    cfg = components.dit.config
    session.set_prompt_embeddings(torch.randn(1, cfg.text_len, cfg.text_dim).to("cuda", components.dtype))
    frames = (torch.rand(5 + 4 * chunks, height, width, 3) * 255).to(torch.uint8)
    made = int(session.push(frames[:5]).cpu().shape[0])
    for i in range(chunks):
        made += int(session.push(frames[5 + 4 * i : 9 + 4 * i]).cpu().shape[0])
    return made


def main() -> dict:
    device = torch.device("cuda")
    components = random_components(device, torch.bfloat16)
    components.optimize()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    total = torch.cuda.mem_get_info()[1]
    headroom = 4 * 2**30
    torch.cuda.set_per_process_memory_fraction((base + headroom) / total)
    report: dict = {"models_gib": base / 2**30, "limit_gib": (base + headroom) / 2**30}
    t0 = time.perf_counter()
    try:
        stream(components, 960, 1664, (700, 500, 400, 200), "stream", 3)
        report["oom_raised"] = False
    except StreamOutOfMemory as exc:
        report["oom_raised"] = True
        report["message"] = str(exc)
    report["oom_handled_s"] = time.perf_counter() - t0
    torch.cuda.synchronize()
    report["held_after_gib"] = torch.cuda.memory_allocated() / 2**30
    report["released"] = torch.cuda.memory_allocated() - base < 0.25 * 2**30
    try:
        report["small_stream_under_limit_frames"] = stream(components, 320, 576, (700,), "none", 4)
    except StreamOutOfMemory as exc:
        report["small_stream_under_limit_frames"] = f"OOM: {exc}"
    torch.cuda.set_per_process_memory_fraction(1.0)
    report["next_stream_frames"] = stream(components, 480, 832, (700, 500), "stream", 6)
    report["ok"] = (
        report["oom_raised"] and report["released"] and report["next_stream_frames"] == 5 + 4 * 6 - 4
    )
    return report


if __name__ == "__main__":
    result = main()
    line = json.dumps(result)
    print(line)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(line + "\n")
