"""Real time beats completeness: a source faster than the pipeline keeps the output latency bounded.

The bound. With chunk time P (engine time for one chunk) and N denoising steps in stream batch, an input
frame waits at most one chunk in the input buffer (each chunk samples everything queued), is processed
(P), comes out N−1 chunks later (the lanes' lag), and is sent within the chunk's pacing slot (P):

    server latency ≤ (N + 2) · P

independent of how long the stream runs. A FIFO that kept every frame would instead grow by
(1 − pipeline fps / camera fps) seconds per second.
"""

from __future__ import annotations

import asyncio
import re

from server.harness import ServerProcess, wait_sessions
from server.rtc_client import RtcClient, SyntheticCamera

STEPS = [1000, 750, 500]  # N = 3 lanes: the slow (and laggy) configuration
CAMERA_FPS = 30.0


def test_fast_source_keeps_latency_bounded(server: ServerProcess) -> None:
    async def run() -> tuple[dict, dict, str]:
        async with server.async_client() as http:
            camera = SyntheticCamera(fps=CAMERA_FPS, height=240, width=320)
            client = RtcClient(http, camera=camera)
            settings = {"height": 256, "width": 256, "steps": STEPS}
            sid = await client.connect(prompts=["a charcoal sketch"], settings=settings)
            await asyncio.sleep(5.0)
            early = (await http.get(f"/api/v1/sessions/{sid}")).json()
            await asyncio.sleep(5.0)
            late = (await http.get(f"/api/v1/sessions/{sid}")).json()
            metrics = (await http.get("/metrics")).text
            await client.close()
            await wait_sessions(http, 0)
            return early, late, metrics

    early, late, metrics = asyncio.run(run())
    stats, out = late["stats"], late["output"]
    assert stats["pipeline_fps"] < CAMERA_FPS, "the pipeline must be slower than the source for this test"
    assert stats["dropped_sampled"] > 0 and stats["input_queue"] <= 32
    bound = (len(STEPS) + 2) * stats["chunk_latency_p90"]
    print(
        f"\npipeline {stats['pipeline_fps']:.1f} fps, input {stats['input_fps']:.1f} fps, sent {out['fps']:.1f} fps; "
        f"chunk p50 {stats['chunk_latency_p50']:.3f}s p90 {stats['chunk_latency_p90']:.3f}s; "
        f"latency p50 {out['latency_p50']:.3f}s p90 {out['latency_p90']:.3f}s (at 5 s: p50 "
        f"{early['output']['latency_p50']:.3f}s); bound {bound:.3f}s; dropped: sampled {stats['dropped_sampled']}, "
        f"overflow {stats['dropped_input_overflow']} of {stats['frames_received']} received"
    )
    assert out["latency_p90"] <= bound + 0.25, (out, stats)
    # No backlog builds up: the second five seconds are no slower than the first (a FIFO would be ~2 s worse).
    assert out["latency_p50"] <= early["output"]["latency_p50"] + max(0.5, 2 * stats["chunk_latency_p50"])
    dropped = re.search(r'^wanstream_frames_dropped_total\{reason="sampled"\} (\d+)$', metrics, re.M)
    assert dropped is not None and int(dropped.group(1)) >= stats["dropped_sampled"]
