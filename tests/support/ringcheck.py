"""Drive a single-process session and a ring session through the same inputs and controls."""

from __future__ import annotations

from collections.abc import Callable

import torch

from wanstream.engine.components import Components
from wanstream.engine.prompts import Transition, WeightedPrompt
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings

SMALL = dict(height=32, width=48)
PROMPT = ["a red fox"]


def reference(components: Components, **settings: object) -> StreamSession:
    """The single-process engine, float output (exact comparisons need more than uint8)."""
    return StreamSession(components, StreamSettings(**{**SMALL, **settings}), prompts=PROMPT, output="float")


def on_ring(ring, **settings: object):  # -> StreamSession (on a RingBackend)
    return ring.session(prompts=PROMPT, output="float", **{**SMALL, **settings})


def stream(session, clip: torch.Tensor, step: int = 7) -> torch.Tensor:
    outs = [session.push(clip[i : i + step]) for i in range(0, clip.shape[0], step)]
    outs.append(session.flush())
    return torch.cat(outs)


def flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Outputs of a run whose resolution changes, in order, as one vector (frame counts checked apart)."""
    return torch.cat([o.flatten() for o in outputs])


def prompt_changes(session, clip: torch.Tensor) -> list[torch.Tensor]:
    """Prompt changes mid-stream: a refresh (cache kept), a 12-chunk blended transition, a hard cut."""
    outs: list[torch.Tensor] = []

    def push(a: int, b: int) -> None:
        outs.append(session.push(clip[a:b]))

    push(0, 13)
    outs.append(session.set_prompts(["a blue whale"]))
    push(13, 25)
    transition = Transition(steps=12)  # more prompt versions in flight than a rank keeps: evictions
    outs.append(
        session.set_prompts([WeightedPrompt(text="a cat", weight=2), "neon city"], transition=transition)
    )
    push(25, 69)
    outs.append(session.set_prompts(["a dog"], switch="cut"))
    push(69, 81)
    outs.append(session.flush())
    return outs


def live_settings(session, clip: torch.Tensor) -> list[torch.Tensor]:
    """Live settings: seed/steps/noise (from the next chunk), a draining cut, a hard reset, and two
    rebuilds (a different step count, a different size)."""
    outs: list[torch.Tensor] = []
    n = len(session.settings.denoising_steps)

    def push(a: int, b: int) -> None:
        outs.append(session.push(clip[a:b]))

    def do(op: Callable[[], torch.Tensor]) -> None:
        outs.append(op())

    push(0, 13)
    do(lambda: session.update({"seed": 9, "steps": (650, 450, 300)[:n], "noise_scale": 0.7}))
    push(13, 25)
    do(lambda: session.set_prompts(["a dog"], switch="cut", drain=True))
    push(25, 38)
    do(session.reset)
    push(38, 51)
    do(lambda: session.update({"steps": (700,)}))
    push(51, 63)
    do(lambda: session.update({"steps": (700, 500), "height": 48}))
    push(63, 78)
    do(session.flush)
    return outs


def text_mode(session) -> list[torch.Tensor]:
    outs = [session.generate(3)]
    outs.append(session.set_prompts(["a forest"], transition=Transition(steps=3)))
    outs.append(session.generate(4))
    outs.append(session.flush())
    return outs
