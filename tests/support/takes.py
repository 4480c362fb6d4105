"""Driving a logged session in take tests."""

from __future__ import annotations

import torch

from wanstream.engine.session import StreamSession


def push_chunk(session: StreamSession, clip: torch.Tensor, i: int) -> torch.Tensor:
    """Push the chunk of `clip` that starts at frame `i` (frames 0-4 at 0, else i to i+3) and note every frame
    that came out as sent, as the server's worker does; returns them."""
    out = session.push(clip[i : i + 4] if i else clip[:5])
    first = session.frames_out - out.shape[0]
    for j, image in enumerate(out.numpy()):
        session.log().note_output(first + j, image)
    return out
