"""Out of memory ends only the stream that hit it: a clear message, its memory dropped, the next stream runs.
(The GPU run in tools/gpu/ forces a real CUDA OOM with set_per_process_memory_fraction.)"""

from __future__ import annotations

import pytest
import torch

from wanstream import Pipeline
from wanstream.engine.session import SessionError, StreamOutOfMemory

from support.clips import moving_clip

SMALL = dict(height=32, width=48)


def test_oom_mid_stream_closes_that_session_with_a_useful_message(demo_pipeline: Pipeline) -> None:
    session = demo_pipeline.session(prompts=["a red fox"], steps=(700, 500), **SMALL)
    clip = moving_clip(13)
    session.push(clip[:5])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has ...")

    session.denoiser._step = out_of_memory
    with pytest.raises(StreamOutOfMemory) as info:
        session.push(clip[5:13])
    message = str(info.value)
    assert "2.50 GiB" in message and "48x32" in message  # what was asked for, at which size (width x height)
    assert "fewer denoising steps" in message and "batching 'none'" in message  # what to lower
    assert session.closed == "out of GPU memory"
    assert session.denoiser.cache is None and session.pending_frames == 0  # its buffers are dropped
    with pytest.raises(SessionError, match="closed"):
        session.push(clip[:4])

    fresh = demo_pipeline.session(prompts=["a red fox"], steps=(700, 500), **SMALL)
    assert fresh.push(clip[:5]).shape[0] == 5  # the next stream runs


def test_other_errors_are_not_turned_into_out_of_memory(demo_pipeline: Pipeline) -> None:
    session = demo_pipeline.session(prompts=["a red fox"], **SMALL)

    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    session.denoiser._step = broken
    with pytest.raises(RuntimeError, match="something else"):
        session.push(moving_clip(5))
    assert session.closed is None
