"""A take whose chunks ran eager code while compiled code was still compiling replays bit for bit.

On the GPU a new shape compiles in the background while the stream runs it eagerly (issue 16), so which chunks
ran which code — and compiled and eager code round differently — depends on timing. The journal records the
eager calls of each recorded call (`models.numerics`) and the replay runs the same calls the same way. Here the
"compiled" block halves are stand-ins that differ from the eager ones on purpose (scaled by 1 %), and the live
stream's compile of the 3-lane shape is held open for some chunks; the replay, on freshly built networks in a
fresh compile state where nothing is held open, must still give the live frames, and gives others without
`numerics.force`.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import pytest

from wanstream import Pipeline
from wanstream.engine.denoise.local import LocalBackend
from wanstream.models import dit as dit_module
from wanstream.models import numerics
from wanstream.models.fastpath import COMPILES, FALLBACKS, CompiledOrEager
from wanstream.takes import load_log, replay, save_log

from support.clips import moving_clip
from support.graphs import CpuGraphs
from support.takes import push_chunk

SMALL = dict(height=32, width=48)


@pytest.fixture(autouse=True)
def _clean():
    COMPILES.forget()
    FALLBACKS.clear()
    yield
    assert COMPILES.wait(10)
    COMPILES.forget()
    FALLBACKS.clear()


class OtherRounding:
    """A compiled function's stand-in whose results differ from the eager code's (1 %), so every frame shows
    which code ran. On the helper thread a new signature "compiles" until `release` is set."""

    def __init__(self, eager, release: threading.Event) -> None:
        self.eager, self.release = eager, release

    def __call__(self, *args, **kwargs):
        if threading.current_thread().name == "compile-shapes":
            assert self.release.wait(20), "the test never released the compile"
        out = self.eager(*args, **kwargs)
        return tuple(t * 1.01 for t in out) if isinstance(out, tuple) else out * 1.01


def install(pipe: Pipeline, release: threading.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    dit = pipe.components.dit
    monkeypatch.setattr(
        dit,
        "_halves",
        tuple(
            CompiledOrEager(OtherRounding(f, release), f, name, background=True)
            for name, f in (
                ("DiT block, first half", dit_module._first_half),
                ("DiT block, second half", dit_module._second_half),
            )
        ),
    )


def graphs_in_every_session(monkeypatch: pytest.MonkeyPatch, graphs: type[CpuGraphs] = CpuGraphs) -> None:
    """Every session built from here (the live one, the replays') steps through `graphs`, as on a GPU
    (a CPU stand-in for CUDA graphs: tests/support)."""
    build = LocalBackend.build

    def build_with_graphs(self, *args, **kwargs):
        denoiser = build(self, *args, **kwargs)
        denoiser.graphs = graphs(denoiser.cache, denoiser._step)
        return denoiser

    monkeypatch.setattr(LocalBackend, "build", build_with_graphs)


def test_eager_chunks_of_a_pending_compile_replay_as_they_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graphs_in_every_session(monkeypatch)

    clip = moving_clip(81)
    live_pipe = Pipeline.demo()
    release = threading.Event()
    release.set()
    install(live_pipe, release, monkeypatch)
    session = live_pipe.session(prompts=["a red fox"], steps=(700, 500), seed=5, log=True, **SMALL)
    push_chunk(session, clip, 0)
    for i in range(5, 25, 4):
        push_chunk(session, clip, i)
        assert COMPILES.wait(10)  # the start settles: its shapes compiled
    release.clear()  # from here a new signature compiles until released
    session.update({"steps": [700, 500, 400]})
    for i in range(25, 57, 4):
        push_chunk(session, clip, i)
    assert COMPILES.pending()  # these chunks ran the eager halves for 3 lanes
    release.set()
    assert COMPILES.wait(10)
    for i in range(57, 81, 4):
        push_chunk(session, clip, i)
    outs = session.log().digests
    path = save_log(session.log(), tmp_path / "take.wslog", live_pipe.components)
    with load_log(path) as log:
        eager_ops = [op for op in log.ops if op.eager]
        assert eager_ops and all("DiT block" in site for op in eager_ops for site in op.eager)

    def replayed(forced: bool) -> object:
        COMPILES.forget()  # as a new process: nothing compiled yet, and nothing held open now
        fresh = Pipeline.demo()
        install(fresh, threading.Event(), monkeypatch)
        fresh_release = fresh.components.dit._halves[0].compiled.release
        fresh_release.set()
        fresh.components.dit._halves[1].compiled.release.set()
        with contextlib.ExitStack() as stack:
            if not forced:
                stack.enter_context(monkeypatch.context())
                monkeypatch.setattr(numerics, "force", lambda eager, graphs=None: contextlib.nullcontext())
            with load_log(path) as log:
                return replay(log, fresh.components)

    report = replayed(forced=True)
    assert report.bit_exact and report.compared == len(outs), report.summary()
    assert session.denoiser.graphs.stats.replays > 0  # the take ran on graphs too
    unforced = replayed(forced=False)
    assert unforced.compared == len(outs) and not unforced.bit_exact  # the record is what made it exact
    assert np.isfinite(unforced.identical)


def test_eager_calls_between_compiled_ones_replay_at_their_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another thread's compile traces, torch's process-wide "is FX tracing?" flag makes a compiled call
    run eager code — in the middle of a chunk, between compiled calls (seen on an H100: a take's frames differed
    only while the VAE compiled in the background). The log notes each such call's place among its site's calls
    and the replay runs exactly those eagerly: the number alone (the first n eager) gives other frames."""
    from wanstream.models import fastpath

    release = threading.Event()
    release.set()
    live_pipe = Pipeline.demo()
    install(live_pipe, release, monkeypatch)
    tracing = {"calls": 0, "on": False}

    def another_thread_traces() -> bool:  # on for a few calls now and then, in the middle of chunks
        tracing["calls"] += 1
        return tracing["on"] and tracing["calls"] % 5 in (2, 3)

    monkeypatch.setattr(fastpath, "_fx_tracing", another_thread_traces)
    clip = moving_clip(61)
    session = live_pipe.session(prompts=["a red fox"], steps=(700, 500), seed=5, log=True, **SMALL)
    for n, i in enumerate([0, *range(5, 61, 4)]):
        tracing["on"] = n in (3, 4, 7, 8)
        push_chunk(session, clip, i)
    path = save_log(session.log(), tmp_path / "take.wslog", live_pipe.components)
    with load_log(path) as log:
        places = [p for op in log.ops for ps in op.eager.values() for p in ps]
        assert places and any(p > 0 for p in places)  # some eager calls came after compiled ones
    monkeypatch.setattr(fastpath, "_fx_tracing", lambda: False)  # the replay's process: nothing traces

    def replayed(first_n: bool) -> object:
        fresh = Pipeline.demo()
        install(fresh, release, monkeypatch)
        with contextlib.ExitStack() as stack:
            if first_n:  # the first logs' rule: a site's first n calls eager
                force = numerics.force
                stack.enter_context(monkeypatch.context())
                monkeypatch.setattr(
                    numerics,
                    "force",
                    lambda eager, graphs=None: force(
                        {s: range(len(p)) for s, p in (eager or {}).items()}, graphs
                    ),
                )
            with load_log(path) as log:
                return replay(log, fresh.components)

    report = replayed(first_n=False)
    assert report.bit_exact and report.compared == len(session.log().digests), report.summary()
    assert not replayed(first_n=True).bit_exact  # where the eager calls fell is what made it exact


def test_a_log_of_eager_counts_replays_its_calls_first() -> None:
    """The first logs noted how many calls of a site ran eager code, not where: they read as the first ones."""
    from wanstream.engine.journal import JournalOp

    row = {"index": 0, "target": "session", "name": "push", "args": {}, "outputs": 4, "first_output": 0}
    op = JournalOp.from_json({**row, "time": 0.0, "eager": {"DiT block, first half (...)": 3}})
    assert op.eager == {"DiT block, first half (...)": [0, 1, 2]}
    assert JournalOp.from_json(op.to_json()).eager == op.eager


class _ScaledReplay:
    """A recorded step whose replay rounds otherwise than the step launched directly (its outputs × 1.01)."""

    def __init__(self, graph) -> None:
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()
        for out in self.graph.outputs:
            out.mul_(1.01)


class OtherRoundingGraphs(CpuGraphs):
    def _record(self, run):
        graph, outputs = super()._record(run)
        return _ScaledReplay(graph), outputs


def test_steps_replay_on_a_graph_exactly_where_the_live_stream_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live stream captures a step's CUDA graph only when no other thread's compile runs, so which steps
    replayed a graph depends on timing — and a graph may round otherwise than the same step launched directly
    (on an H100 a take's frames differed only in the chunks after a live change, and only with graphs on). The
    log notes the steps that ran on a graph; the replay runs those on one, the others directly."""
    graphs_in_every_session(monkeypatch, OtherRoundingGraphs)
    from wanstream.models.fastpath import GATE

    clip = moving_clip(61)
    live_pipe = Pipeline.demo()
    session = live_pipe.session(prompts=["a red fox"], steps=(700, 500), seed=5, log=True, **SMALL)
    inside, release = threading.Event(), threading.Event()

    def compile_elsewhere() -> None:  # another thread's compile: recordings wait until it is done
        with GATE.background():
            inside.set()
            release.wait(30)

    holder = threading.Thread(target=compile_elsewhere)
    holder.start()
    assert inside.wait(5)
    try:
        for n, i in enumerate([0, *range(5, 61, 4)]):
            if n == 6:
                release.set()
                holder.join(5)
            push_chunk(session, clip, i)
    finally:
        release.set()
        holder.join(5)
    stats = session.denoiser.graphs.stats
    assert stats.deferred >= 1 and stats.replays >= 1  # some steps ran directly, later ones on graphs
    path = save_log(session.log(), tmp_path / "take.wslog", live_pipe.components)
    with load_log(path) as log:
        noted = [op.graphs for op in log.ops if op.name == "push"]
        assert any(noted) and not all(noted)

    def replayed(as_noted: bool) -> object:
        fresh = Pipeline.demo()
        with contextlib.ExitStack() as stack:
            if not as_noted:  # graphs used as the replay can, as before they were noted
                force = numerics.force
                stack.enter_context(monkeypatch.context())
                monkeypatch.setattr(numerics, "force", lambda eager, graphs=None: force(eager, None))
            with load_log(path) as log:
                return replay(log, fresh.components)

    report = replayed(as_noted=True)
    assert report.bit_exact and report.compared == len(session.log().digests), report.summary()
    assert not replayed(as_noted=False).bit_exact  # where the graphs ran is what made it exact
