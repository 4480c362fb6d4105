"""On the GPU: a real CUDA out-of-memory ends only the stream that hit it (a clear message, its memory back),
and the next stream in the same process starts — under the same memory limit and after it is lifted.

The limit is `torch.cuda.set_per_process_memory_fraction`: first the loaded (full-size, random) models plus 4 GiB,
which a 960x1664 four-step stream cannot fit (refused before it starts); then, under a running 480x832 stream,
just above what it holds, so its next chunk runs out mid-stream. Prints one JSON line (and writes it to argv[1]).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from wanstream.engine.random_weights import random_components
from wanstream.engine.session import SessionError, StreamOutOfMemory, StreamSession
from wanstream.engine.settings import StreamSettings


def make(components, height: int, width: int, steps: tuple[int, ...], batching: str) -> StreamSession:
    session = StreamSession(
        components, StreamSettings(height=height, width=width, steps=steps, batching=batching), output="uint8"
    )
    cfg = components.dit.config
    session.set_prompt_embeddings(torch.randn(1, cfg.text_len, cfg.text_dim).to("cuda", components.dtype))
    return session


def feed(session: StreamSession, chunks: int, first: bool = True) -> int:
    h, w = session.settings.height, session.settings.width
    frames = (torch.rand(5 + 4 * chunks, h, w, 3) * 255).to(torch.uint8)
    made = int(session.push(frames[:5]).cpu().shape[0]) if first else 0
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
    report: dict = {"models_gib": base / 2**30}

    # 1. A stream that cannot fit is refused before it starts (its cache is allocated first).
    torch.cuda.set_per_process_memory_fraction((base + 4 * 2**30) / total)
    try:
        make(components, 960, 1664, (700, 500, 400, 200), "stream")
        report["refused_up_front"] = False
    except SessionError as exc:
        report["refused_up_front"] = True
        report["refused_message"] = str(exc)[:400]

    # 2. Out of memory mid-stream: a running stream, then the limit lowered under what its next chunk needs.
    torch.cuda.set_per_process_memory_fraction(1.0)
    session = make(components, 480, 832, (700, 500), "stream")
    report["before_oom_frames"] = feed(session, 6)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**28) / total)
    t0 = time.perf_counter()
    try:
        feed(session, 4, first=False)
        report["oom_mid_stream"] = False
    except StreamOutOfMemory as exc:
        report["oom_mid_stream"] = True
        report["oom_message"] = str(exc)
    report["oom_handled_s"] = time.perf_counter() - t0
    report["session_closed"] = session.closed
    del session
    torch.cuda.synchronize()
    report["held_after_gib"] = torch.cuda.memory_allocated() / 2**30
    report["released"] = torch.cuda.memory_allocated() - base < 0.25 * 2**30

    # 3. The next stream in the same process runs once the memory is there.
    torch.cuda.set_per_process_memory_fraction(1.0)
    report["next_stream_frames"] = feed(make(components, 480, 832, (700, 500), "stream"), 6)
    report["ok"] = (
        report["refused_up_front"]
        and report["oom_mid_stream"]
        and report["released"]
        and report["next_stream_frames"] == 5 + 4 * 6 - 4
    )
    return report


if __name__ == "__main__":
    result = main()
    line = json.dumps(result)
    print(line)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(line + "\n")
