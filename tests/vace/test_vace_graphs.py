"""VACE calls on the captured-graph path (CPU stand-in for CUDA graphs, `support.graphs`): the same output as
the eager path bit for bit, a new scale or control frame replays the captured step, a new context shape is a
new signature, and a failed capture falls back to the eager step."""

from __future__ import annotations

import warnings

import pytest
import torch

from wanstream.engine.components import Components
from wanstream.engine.graphs import StepGraphs
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.engine.vace import VaceConditioner
from wanstream.models.dit import StreamExtension
from wanstream.models.fastpath import FALLBACKS
from wanstream.models.vace import VaceExtension

from support.graphs import CpuGraphs, FailingGraphs

H, W = 32, 48


def frames_u8(t: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(t, H, W, 3, generator=gen) * 255).to(torch.uint8)


def inpaint(t: int) -> torch.Tensor:
    m = torch.zeros(t, H, W)
    m[:, 8:24, 8:40] = 1.0
    return m


class _Recorder:
    """Wraps a session's graphs: which calls went through them, and with which extension."""

    def __init__(self, graphs: StepGraphs) -> None:
        self.graphs = graphs
        self.extensions: list[StreamExtension | None] = []

    def eligible(self, x, plan, extension=None) -> bool:
        return self.graphs.eligible(x, plan, extension)

    def __call__(self, x, t, cross, plan, extension=None, *, capture=True):
        self.extensions.append(extension)
        return self.graphs(x, t, cross, plan, extension, capture=capture)


def vace_stream(components: Components, graphs_cls: type[StepGraphs] | None):
    settings = StreamSettings(
        height=H,
        width=W,
        mode="text",
        batching="none",
        cache_context="clean",
        eviction="fifo",
        sink_threshold=-1.0,
        seed=11,
        steps=(700, 500),
    )
    session = StreamSession(components, settings, prompts=["a cat in the rain"], output="float")
    cond = VaceConditioner(session)
    session.attach(cond)
    recorder = None
    if graphs_cls is not None:
        d = session.denoiser
        recorder = _Recorder(graphs_cls(d.cache, d._step))
        d.graphs = recorder  # type: ignore[assignment]
    return session, cond, recorder


def _chunk(cond: VaceConditioner, k: int) -> torch.Tensor:
    """Chunk k of a control stream: new frames every chunk, with an inpainting mask on every third."""
    n = 5 if k == 0 else 4
    return cond.push(frames_u8(n, seed=100 + k), inpaint(n) if k % 3 == 2 else None)


@pytest.fixture(autouse=True)
def _clean_fallbacks():
    FALLBACKS.clear()
    yield
    FALLBACKS.clear()


def test_vace_calls_replay_captured_steps_bit_for_bit_through_scale_and_control_changes(
    vace_components: Components,
) -> None:
    _, eager_cond, _ = vace_stream(vace_components, None)
    _, cond, rec = vace_stream(vace_components, CpuGraphs)
    graphs = rec.graphs
    plan = {8: 0.5, 10: 2.0, 11: 0.0}  # chunk → scale set before it
    captured_at: list[int] = []
    for k in range(13):
        if k in plan:
            eager_cond.set_scale(plan[k])
            cond.set_scale(plan[k])
        expected = _chunk(eager_cond, k)
        assert torch.equal(_chunk(cond, k), expected), f"chunk {k}"
        captured_at.append(graphs.stats.captured)
    # Every DiT call took the graph path with its VACE extension: the steps with hints, the t = 0 cache
    # pass without (Scope's quirk: the cache pass has no context).
    assert len(rec.extensions) == 13 * 3
    assert all(isinstance(e, VaceExtension) for e in rec.extensions)
    assert [e.context is not None for e in rec.extensions[:3]] == [True, True, False]
    # Captures happen while the cache fills (a new cache phase each chunk, chunks 1-4 here: a stream's first
    # chunk is captured at a later call, never inside it); from then on new control frames, masks on and off and three scale changes
    # (chunks 8-12) all replay the captured steps.
    assert captured_at[0] == 0 < captured_at[1] < captured_at[7] == captured_at[-1], captured_at
    assert graphs.stats.replays > 2 * 7 and graphs.stats.failed == 0 and FALLBACKS.total() == 0
    assert [c.scale for c in cond.history][7:] == [1.0, 0.5, 0.5, 2.0, 0.0, 0.0]
    # Each signature's VACE key carries the module and its numerics, the context shapes come with it.
    vace_keys = [k for k in graphs._graphs if isinstance(k[-2], tuple) and k[-2][0] == "vace"]
    assert vace_keys and {k[-2][1] for k in vace_keys} == {vace_components.vace}
    # The static inputs are one set per extension signature, shared by its graphs (not one per cache phase):
    # later chunks' 1-frame context, the cache pass without one, and the first chunk's 2-frame context (its
    # steps ran without a graph, and were captured at a later call for the next stream's first chunk).
    assert len(graphs._inputs) == 3 < graphs.stats.captured
    assert graphs.stats.stream_start == 3  # the first chunk's two steps and its cache pass
    assert graphs.stats.later >= 1 and not graphs._later


def test_a_new_context_shape_captures_a_new_signature(vace_components: Components) -> None:
    _, eager_cond, _ = vace_stream(vace_components, None)
    _, cond, rec = vace_stream(vace_components, CpuGraphs)
    for k in range(8):
        assert torch.equal(_chunk(cond, k), _chunk(eager_cond, k))
    before = rec.graphs.stats.captured
    reference = frames_u8(1, seed=3)[0]
    for c in (eager_cond, cond):  # one-shot: the next chunk's context is the reference + the chunk's latent
        c.set_reference_images([reference])
    assert torch.equal(_chunk(cond, 8), _chunk(eager_cond, 8))
    assert cond.history[-1].context_frames == 2
    assert rec.graphs.stats.captured == before + 1  # both steps share the new signature; the cache pass not
    assert torch.equal(_chunk(cond, 9), _chunk(eager_cond, 9))  # back to one context frame: replayed
    assert rec.graphs.stats.captured == before + 1


def test_a_failed_vace_capture_falls_back_to_the_eager_step(vace_components: Components) -> None:
    _, eager_cond, _ = vace_stream(vace_components, None)
    _, cond, rec = vace_stream(vace_components, FailingGraphs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(4):
            if k == 2:
                eager_cond.set_scale(0.5)
                cond.set_scale(0.5)
            assert torch.equal(_chunk(cond, k), _chunk(eager_cond, k)), f"chunk {k}"
    stats = rec.graphs.stats
    assert stats.failed >= 2 and stats.captured == 0 and stats.replays == 0
    assert FALLBACKS.snapshot()["counts"] == {"cuda_graph": stats.failed}
    assert "VaceExtension" in FALLBACKS.snapshot()["last"]["cuda_graph"]
    assert len([w for w in caught if "cuda_graph failed" in str(w.message)]) == 1


def test_calls_that_cannot_be_captured_run_eagerly(vace_components: Components) -> None:
    session, _, rec = vace_stream(vace_components, CpuGraphs)
    x = torch.zeros(1, 1, 16, H // 8, W // 8)
    plan = session.denoiser.cache.plan([0], 1)
    # An extension that does not describe its inputs (the base class), and a traced VACE call (the trace
    # keeps intermediate tensors a replay would not refresh), are never captured.
    assert not rec.graphs.eligible(x, plan, StreamExtension())
    traced = VaceExtension(vace_components.vace, None, None, trace={})
    assert not rec.graphs.eligible(x, plan, traced)
    # A context for another frame size is the caller's error, raised before any capture is tried.
    text = vace_components.vace.text_kv(vace_components.dit, session.prompt.embedding)
    wrong = VaceExtension(vace_components.vace, torch.zeros(96, 1, H // 8 + 2, W // 8), text)
    with pytest.raises(ValueError, match="VACE context latents"):
        rec.graphs.eligible(x, plan, wrong)
    assert rec.graphs.stats.failed == 0 and FALLBACKS.total() == 0
