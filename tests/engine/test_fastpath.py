"""The optimised path's guards on the CPU: a failed CUDA-graph capture or compile falls back to a correct,
slower path (same output, one warning, counted), and captures never run beside another thread's GPU work.

The device side of `StepGraphs` (warm-up on the capture stream, recording) is replaced by a stand-in that
records the step as a closure and replays it by running it (`support.graphs`): the engine's bookkeeping around
it — keys, static buffers, cache save/restore, deferral, fallback — is the code that runs on the GPU."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

from wanstream import Pipeline
from wanstream.engine.graphs import StepGraphs
from wanstream.engine.session import StreamOutOfMemory
from wanstream.models.fastpath import FALLBACKS, GATE, CaptureGate, CompiledOrEager

from support.clips import moving_clip
from support.graphs import CpuGraphs, FailingGraphs

SMALL = dict(height=32, width=48)


def _stream(pipe: Pipeline, graphs_cls: type[StepGraphs] | None, batching: str, steps=(700, 500)):
    session = pipe.session(prompts=["a red fox"], batching=batching, steps=steps, seed=5, **SMALL)
    if graphs_cls is not None:
        d = session.denoiser
        d.graphs = graphs_cls(d.cache, d._step)
    return session


def _run(session, clip: torch.Tensor) -> torch.Tensor:
    outs = [session.push(clip[i : i + 4]) for i in range(0, clip.shape[0], 4)]
    outs.append(session.flush())
    return torch.cat(outs)


@pytest.fixture(autouse=True)
def _clean_fallbacks():
    FALLBACKS.clear()
    yield
    FALLBACKS.clear()


@pytest.mark.parametrize("batching", ["stream", "none"])
def test_replayed_steps_equal_the_eager_path(demo_pipeline: Pipeline, batching: str) -> None:
    clip = moving_clip(61)  # long enough for the cache to fill: later chunks replay earlier captures
    eager = _run(_stream(demo_pipeline, None, batching), clip)
    session = _stream(demo_pipeline, CpuGraphs, batching)
    assert torch.equal(_run(session, clip), eager)
    stats = session.denoiser.graphs.stats
    assert stats.captured >= 1 and stats.replays > stats.captured and stats.failed == 0
    assert FALLBACKS.total() == 0


@pytest.mark.parametrize("batching", ["stream", "none"])
def test_a_failed_capture_falls_back_with_one_warning_and_the_same_output(
    demo_pipeline: Pipeline, batching: str
) -> None:
    clip = moving_clip(25)
    eager = _run(_stream(demo_pipeline, None, batching), clip)
    session = _stream(demo_pipeline, FailingGraphs, batching)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(session, clip)
    assert torch.equal(out, eager)  # the cache state the failed attempt touched was restored
    stats = session.denoiser.graphs.stats
    assert stats.failed >= 1 and stats.replays == 0 and stats.captured == 0
    assert FALLBACKS.snapshot()["counts"] == {"cuda_graph": stats.failed}
    assert "cudaErrorStreamCaptureInvalidated" in FALLBACKS.snapshot()["last"]["cuda_graph"]
    ours = [w for w in caught if "cuda_graph failed" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]  # one warning, however many signatures fail
    assert "stream continues" in str(ours[0].message)


@pytest.mark.parametrize("batching", ["stream", "none"])
def test_a_streams_first_chunk_is_captured_later_and_replayed_by_the_next_stream(
    demo_pipeline: Pipeline, batching: str
) -> None:
    """Warming up and recording a stream's first chunk would delay its first frame (TTFF): it runs without a
    graph, and its signature is captured at a later call of the stream. The next stream's first chunk (after a
    reset, a hard cut) replays it. The output is the eager path's throughout."""
    clip = moving_clip(29)
    plain = _stream(demo_pipeline, None, batching)
    eager = [_run(plain, clip) for _ in range(2)]
    session = _stream(demo_pipeline, CpuGraphs, batching)
    graphs = session.denoiser.graphs
    tried: list[tuple[int, bool]] = []  # (latent frames, inside a first chunk?) of each warm-up / recording
    original = graphs._try_capture

    def spy(key, x, *args, **kwargs):
        tried.append((x.shape[1], session.denoiser._stream_start))
        return original(key, x, *args, **kwargs)

    graphs._try_capture = spy
    assert torch.equal(_run(session, clip), eager[0])
    steps = len(session.denoiser.steps)
    assert graphs.stats.stream_start == steps  # the first chunk's steps ran without a graph
    assert (2, False) in tried and (2, True) not in tried  # captured later, never inside a first chunk
    later = graphs.stats.later  # the first chunk's signatures (its steps' cache phases differ)
    assert later >= 1 and not graphs._later
    replays = graphs.stats.replays
    # A second stream through the same signatures: its first chunk replays the graph.
    assert torch.equal(_run(session, clip), eager[1])
    assert graphs.stats.stream_start == steps and graphs.stats.later == later  # every step on its graph
    assert graphs.stats.replays >= replays + steps
    assert graphs.stats.failed == 0 and FALLBACKS.total() == 0


def test_a_first_chunk_capture_waits_while_anything_compiles(demo_pipeline: Pipeline, monkeypatch) -> None:
    """Deferred like any capture: while a compile runs, the remembered first-chunk signature stays uncaptured
    (and the stream runs on); once nothing compiles, a later call captures it."""
    from wanstream.models import fastpath

    clip = moving_clip(29)
    eager = _run(_stream(demo_pipeline, None, "stream"), clip)
    session = _stream(demo_pipeline, CpuGraphs, "stream")
    graphs = session.denoiser.graphs
    compiling = [True]
    monkeypatch.setattr(fastpath.COMPILES, "pending", lambda: compiling[0])
    outs = [session.push(clip[i : i + 4]) for i in range(0, 20, 4)]
    assert graphs.stats.captured == 0 and graphs.stats.deferred >= 1 and graphs._later  # kept for later
    compiling[0] = False
    outs += [session.push(clip[i : i + 4]) for i in range(20, clip.shape[0], 4)] + [session.flush()]
    assert torch.equal(torch.cat(outs), eager)
    assert graphs.stats.later >= 1 and not graphs._later


def test_a_failed_signature_is_not_captured_again(demo_pipeline: Pipeline) -> None:
    session = _stream(demo_pipeline, FailingGraphs, "none", steps=(700,))
    clip = moving_clip(21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(session, clip)
        failed = session.denoiser.graphs.stats.failed
        _run(session, clip)  # a second stream through the same signatures
    assert session.denoiser.graphs.stats.failed == failed


def test_out_of_memory_in_capture_is_not_hidden(demo_pipeline: Pipeline) -> None:
    class OomGraphs(CpuGraphs):
        fail_with = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    session = _stream(demo_pipeline, OomGraphs, "none")
    with pytest.raises(StreamOutOfMemory, match=r"2\.00 GiB"):  # reaches the session's out-of-memory handling
        _run(session, moving_clip(13))
    assert FALLBACKS.total() == 0


def test_capture_is_deferred_while_another_thread_compiles(demo_pipeline: Pipeline) -> None:
    clip = moving_clip(25)
    eager = _run(_stream(demo_pipeline, None, "stream"), clip)
    session = _stream(demo_pipeline, CpuGraphs, "stream")
    inside, release = threading.Event(), threading.Event()

    def compile_thread() -> None:
        with GATE.background():
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=compile_thread)
    thread.start()
    inside.wait(5)
    try:
        first = [session.push(clip[i : i + 4]) for i in range(0, 16, 4)]
        stats = session.denoiser.graphs.stats
        assert stats.deferred >= 1 and stats.captured == 0  # ran uncaptured, did not wait
        # nor warmed up: the warm-up's copy of the KV cache would meet the compile's memory (call 29)
        assert not session.denoiser.graphs._warm
    finally:
        release.set()
        thread.join(5)
    rest = [session.push(clip[i : i + 4]) for i in range(16, 25, 4)] + [session.flush()]
    assert session.denoiser.graphs.stats.captured >= 1  # captured once the compile was done
    assert torch.equal(torch.cat(first + rest), eager)


# --- the gate itself ------------------------------------------------------------------------------------


def _in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_gate_capture_waits_for_other_threads_work_and_holds_new_work_back() -> None:
    gate = CaptureGate()
    order: list[str] = []
    in_work, leave_work = threading.Event(), threading.Event()

    def worker() -> None:
        with gate.work():
            in_work.set()
            leave_work.wait(5)
            order.append("work ends")

    t = _in_thread(worker)
    in_work.wait(5)
    threading.Timer(0.2, leave_work.set).start()
    with gate.capture(max_wait=5) as granted:
        order.append("capture")
        late_entered = threading.Event()

        def late() -> None:
            with gate.work():
                late_entered.set()

        t2 = _in_thread(late)
        assert not late_entered.wait(0.3)  # new work waits while recording
    assert granted and order == ["work ends", "capture"]
    assert late_entered.wait(5)
    t.join(5)
    t2.join(5)
    assert gate.busy() == {"work": 0, "background": 0}


def test_gate_defers_instead_of_waiting_for_background_work_or_a_second_capturer() -> None:
    gate = CaptureGate()
    inside, release = threading.Event(), threading.Event()

    def background() -> None:
        with gate.background():
            inside.set()
            release.wait(5)

    t = _in_thread(background)
    inside.wait(5)
    start = time.monotonic()
    with gate.capture(max_wait=5) as granted:
        assert not granted
    assert time.monotonic() - start < 1.0
    release.set()
    t.join(5)

    holding, done = threading.Event(), threading.Event()

    def capturer() -> None:
        with gate.capture() as ok:
            assert ok
            holding.set()
            done.wait(5)

    t = _in_thread(capturer)
    holding.wait(5)
    with gate.capture() as granted:
        assert not granted  # one capture at a time: the second runs uncaptured
    done.set()
    t.join(5)


def test_gate_capture_gives_up_after_max_wait_and_lets_work_resume() -> None:
    gate = CaptureGate()
    in_work, leave = threading.Event(), threading.Event()

    def worker() -> None:
        with gate.work():
            in_work.set()
            leave.wait(5)

    t = _in_thread(worker)
    in_work.wait(5)
    with gate.capture(max_wait=0.1) as granted:
        assert not granted
    with gate.work():  # nothing left blocked
        pass
    leave.set()
    t.join(5)


def test_nested_holds_on_one_thread_never_wait_for_a_pending_capture() -> None:
    gate = CaptureGate()
    in_work, nested_done = threading.Event(), threading.Event()

    def worker() -> None:
        with gate.work():
            in_work.set()
            time.sleep(0.1)  # a capture is now pending on the main thread
            with gate.work():  # e.g. update() calling reset()
                nested_done.set()

    t = _in_thread(worker)
    in_work.wait(5)
    with gate.capture(max_wait=5) as granted:
        assert granted and nested_done.is_set()
    t.join(5)


# --- compile fallback -----------------------------------------------------------------------------------


def test_a_failed_compile_runs_the_eager_function_with_one_warning() -> None:
    calls = {"compiled": 0}

    def compiled(x):
        calls["compiled"] += 1
        raise RuntimeError("BackendCompilerFailed: inductor raised LoweringException")

    def eager(x):
        return x * 2

    fn = CompiledOrEager(compiled, eager, "test block")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
    assert calls["compiled"] == 1  # not retried on every call
    assert FALLBACKS.snapshot()["counts"] == {"compile": 1}
    assert len([w for w in caught if "compile failed in test block" in str(w.message)]) == 1


def test_out_of_memory_in_a_compiled_call_propagates() -> None:
    def compiled(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    fn = CompiledOrEager(compiled, lambda x: x, "test block")
    with pytest.raises(torch.OutOfMemoryError):
        fn(torch.ones(1))
    assert not fn.failed and FALLBACKS.total() == 0


def test_vae_background_compile_failure_is_recorded_and_the_eager_vae_keeps_working() -> None:
    from wanstream.models.vae import _CompiledHalves

    def broken(*args):
        raise RuntimeError("triton compile error")

    halves = _CompiledHalves(
        CompiledOrEager(broken, broken, "enc"), CompiledOrEager(broken, broken, "dec"), background=True
    )
    x = torch.zeros(1, 3, 4, 16, 16)

    def warm() -> None:
        halves.halves[0](x)

    def eager(t: torch.Tensor) -> torch.Tensor:
        return t + 1

    with pytest.warns(RuntimeWarning, match="compile failed"):
        run = halves.run_for("encoder", x, warm, eager)  # eager for now, then compiling in the background
        assert torch.equal(run(x), x + 1)
        assert halves.wait(10)
    assert halves.run_for("encoder", x, warm, eager) is eager  # still eager: the compile failed
    assert FALLBACKS.snapshot()["counts"].get("compile", 0) >= 1
    assert GATE.busy() == {"work": 0, "background": 0}


def test_a_warm_up_that_ran_eager_code_while_another_thread_traced_is_not_warm(
    demo_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another thread's compile traces, a compiled call runs eager code (torch's FX-tracing flag is
    process-wide). A graph's warm-up that did so has not run the compiled code yet, whose first run may not
    happen inside a recording: the signature stays cold (deferred) until a warm-up runs compiled code."""
    from wanstream.models import dit as dit_module
    from wanstream.models import fastpath

    compiled_runs = []

    def compiled(f):
        def run(*args, **kwargs):
            compiled_runs.append(1)
            return f(*args, **kwargs)

        return run

    monkeypatch.setattr(
        demo_pipeline.components.dit,
        "_halves",
        tuple(
            CompiledOrEager(compiled(f), f, name)
            for name, f in (
                ("DiT block, first half", dit_module._first_half),
                ("DiT block, second half", dit_module._second_half),
            )
        ),
    )
    clip = moving_clip(25)
    eager = _run(_stream(demo_pipeline, None, "stream"), clip)
    compiled_runs.clear()
    session = _stream(demo_pipeline, CpuGraphs, "stream")
    tracing = {"on": True}
    monkeypatch.setattr(fastpath, "_fx_tracing", lambda: tracing["on"])
    first = [session.push(clip[i : i + 4]) for i in range(0, 16, 4)]
    graphs = session.denoiser.graphs
    assert (
        not compiled_runs and not graphs._warm and graphs.stats.deferred >= 1 and graphs.stats.captured == 0
    )
    tracing["on"] = False
    rest = [session.push(clip[i : i + 4]) for i in range(16, 25, 4)] + [session.flush()]
    assert compiled_runs and graphs.stats.captured >= 1
    assert torch.equal(torch.cat(first + rest), eager)


def test_vae_background_compile_starts_after_the_eager_call_of_its_shape() -> None:
    """Started before it, the compile's warm-up and the stream's eager call would time cuDNN's algorithms for
    the same convolutions at once, and the last to finish would decide what later calls and a replay use."""
    from wanstream.models.vae import _CompiledHalves

    events: list[str] = []
    x = torch.zeros(1, 3, 4, 16, 16)

    def compiled(t: torch.Tensor, *rest) -> torch.Tensor:
        return t + 1

    halves = _CompiledHalves(
        CompiledOrEager(compiled, compiled, "enc"),
        CompiledOrEager(compiled, compiled, "dec"),
        background=True,
    )

    def eager(t: torch.Tensor) -> torch.Tensor:
        events.append("eager call")
        return t + 1

    def warm() -> None:
        events.append("compile")

    run = halves.run_for("encoder", x, warm, eager)
    assert halves.run_for("encoder", x, warm, eager) is eager  # a second call meanwhile: one compile only
    assert halves.wait(1) and events == []  # nothing started before the first eager call
    run(x)
    assert halves.wait(10)
    assert events == ["eager call", "compile"]
    assert halves.run_for("encoder", x, warm, eager) is halves.halves[0]  # compiled from now on
