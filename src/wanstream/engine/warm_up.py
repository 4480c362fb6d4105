"""A private stream run before the first real one, so that the real one starts at once.

On the optimised GPU path a stream's first chunks compile the DiT's block halves, the KV-cache bookkeeping
and the Wan VAE for their shapes (an empty compile cache: about a minute on an H100; a warm one: seconds,
most of it dynamo tracing), cuDNN times its conv algorithms, and every GPU library makes its handles and plans.
A server that did this in its first client's first frames kept that client waiting with nothing on screen;
`serve` runs this stream while it loads instead (its status names the stage), and any script can call
`Pipeline.warm_up`. What stays per stream: its CUDA graphs (captured within its first chunks, ≈ 0.1 s each).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wanstream.engine.session import StreamSession
from wanstream.engine.settings import DEFAULT_STEPS, SettingsUpdate, StreamSettings


@dataclass(frozen=True)
class WarmUp:
    chunks: int  # chunks the private stream ran
    seconds: float


def chunks_to_fill(settings: StreamSettings) -> int:
    """Chunks until every cache phase has run: the cache fills one latent frame a chunk, and in stream batch
    the last lane starts steps-1 chunks late; each phase attends another length, so it is a new shape."""
    lag = len(settings.denoising_steps) - 1 if settings.batching == "stream" else 0
    return settings.kv_cache_frames + lag + 2


def lane_classes(settings: StreamSettings) -> list[StreamSettings]:
    """`settings`, and in stream batch (one lane per step) the same at a step count of the other lane class:
    the DiT's compiled code has one graph for 1 lane and one for every count from 2 (`models.fastpath`), so
    with both warmed up no live steps change compiles anything."""
    if settings.batching != "stream":
        return [settings]  # one lane whatever the step count
    steps = settings.denoising_steps
    other = steps[:1] if len(steps) > 1 else DEFAULT_STEPS  # the timesteps' values shape nothing
    return [settings, settings.updated(SettingsUpdate(steps=other))]


def warm_up(open_session: Callable[[], StreamSession], settings: StreamSettings) -> WarmUp:
    """Open a stream with `open_session` (at `settings`), run it on grey frames (text mode: from its prompts)
    until its cache is full, then close it. In inference mode, as a server's engine thread and `generate`
    run: compiled code is specialised on the autograd mode and on whether its inputs are inference tensors."""
    start = time.perf_counter()
    chunks = chunks_to_fill(settings)
    with torch.inference_mode():
        session = open_session()
        try:
            if settings.mode == "text":
                for _ in range(chunks):
                    session.generate(1)
            else:
                frames = torch.full((4, settings.height, settings.width, 3), 127, dtype=torch.uint8)
                session.push(frames[:1])  # a stream's first chunk takes one frame more than the others
                for _ in range(chunks):
                    session.push(frames)
                session.flush()  # the lanes drain: the decoder's last shapes too
        finally:
            session.close("warm-up done")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return WarmUp(chunks, time.perf_counter() - start)
