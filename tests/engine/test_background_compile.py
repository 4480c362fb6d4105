"""New shapes of compiled functions compile off the stream's thread (`fastpath.COMPILES`, issue 16: a live change
to 3 denoising steps froze a stream for 10.3 s while the DiT's block halves compiled for 3 lanes in line).

Stand-ins for `torch.compile`d functions block on an Event while they "compile" a new signature, so every
interleaving here is fixed: calls of that signature run the eager code meanwhile, the compiled code afterwards;
a failed compile leaves that signature eager; `StepGraphs` neither warms up nor captures a step whose compiled
code is not ready, and captures it once it is. A last test goes through real `torch.compile` (eager backend) on a
tiny DiT: the helper's compile is the one the stream's calls use (dynamo's guards match theirs)."""

from __future__ import annotations

import sys
import threading
import warnings

import pytest
import torch

from wanstream import Pipeline
from wanstream.models import dit as dit_module
from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.fastpath import COMPILES, FALLBACKS, GATE, GIL, CompiledOrEager, _signature
from wanstream.models.kv_cache import KVCache, KVCacheConfig, track

from support.clips import moving_clip
from support.graphs import CpuGraphs

SMALL = dict(height=32, width=48)
MAIN = threading.main_thread().name


@pytest.fixture(autouse=True)
def _clean():
    import torch._dynamo

    nested_fx = torch._dynamo.config.error_on_nested_fx_trace  # a background compile sets it (fastpath)
    FALLBACKS.clear()
    COMPILES.forget()
    yield
    assert COMPILES.wait(10)
    COMPILES.forget()
    FALLBACKS.clear()
    torch._dynamo.config.error_on_nested_fx_trace = nested_fx


@pytest.fixture
def live_change():
    """The calls below come right after a live change of shapes (a session enters this after a steps change)."""
    with COMPILES.live_change():
        yield


class FakeCompiled:
    """A compiled function's stand-in: runs `eager` and logs (thread, signature) of every call. Its first
    signature compiles at once. A later new one on a helper thread "compiles" until `release` is set (then fails
    if `fail` is set); on the stream's (main) thread it is logged in `in_line`: what issue 16 was."""

    def __init__(self, eager, release: threading.Event | None = None) -> None:
        self.eager = eager
        self.release = release or threading.Event()
        self.compiling = threading.Event()  # set once a helper started compiling a new signature
        self.fail: BaseException | None = None
        self.compiled: set[tuple] = set()
        self.in_line: list[tuple] = []
        self.calls: list[tuple[str, tuple]] = []
        self.arguments: list[tuple] = []

    def __call__(self, *args, **kwargs):
        key = _signature(args, kwargs)
        thread = threading.current_thread().name
        self.calls.append((thread, key))
        self.arguments.append(args)
        if key not in self.compiled:
            if self.compiled and thread == MAIN:
                self.in_line.append(key)
            elif self.compiled:
                self.compiling.set()
                assert self.release.wait(10), "the test never released the compile"
                if self.fail is not None:
                    raise self.fail
            self.compiled.add(key)
        return self.eager(*args, **kwargs)

    def on(self, thread: str, key: tuple | None = None) -> int:
        return sum(1 for t, k in self.calls if t == thread and (key is None or k == key))


def scaled(x: torch.Tensor, *, scale: float) -> torch.Tensor:
    return x * scale + 1


def _background_fn() -> tuple[FakeCompiled, CompiledOrEager]:
    def eager(x: torch.Tensor, *, scale: float) -> torch.Tensor:  # new per test: signatures of its own
        return scaled(x, scale=scale)

    fake = FakeCompiled(eager)
    return fake, CompiledOrEager(fake, eager, "test function", background=True)


@pytest.mark.usefixtures("live_change")
def test_a_new_shape_runs_eager_while_it_compiles_in_the_background_then_compiled() -> None:
    fake, fn = _background_fn()
    interval = sys.getswitchinterval()
    two, three = torch.arange(6.0).reshape(2, 3), torch.arange(9.0).reshape(3, 3)
    assert torch.equal(fn(two, scale=2.0), scaled(two, scale=2.0))
    assert fake.on(MAIN) == 1  # the function's first signature compiles in line (the stream's start-up)

    eager_before = COMPILES.eager_runs()
    assert torch.equal(fn(three, scale=2.0), scaled(three, scale=2.0))  # eager, same result
    assert fake.compiling.wait(5)
    key3 = _signature((three,), {"scale": 2.0})
    for _ in range(3):  # still compiling: eager every time, the compiled function is never waited for
        assert torch.equal(fn(three, scale=2.0), scaled(three, scale=2.0))
    assert torch.equal(fn(two, scale=2.0), scaled(two, scale=2.0))  # a compiled signature stays compiled
    assert fake.on(MAIN, key3) == 0 and fake.on("compile-shapes", key3) == 1
    assert COMPILES.pending() and COMPILES.eager_runs() - eager_before == 4
    assert GATE.busy()["background"] == 1  # the helper holds the gate: no capture meanwhile
    helper_args = fake.arguments[[t for t, _ in fake.calls].index("compile-shapes")]
    assert helper_args[0] is not three and torch.equal(helper_args[0], three)  # a copy of the stream's

    # the stream's thread gets the GIL back sooner
    assert sys.getswitchinterval() == pytest.approx(GIL.switch_s)
    fake.release.set()
    assert COMPILES.wait(5)
    assert sys.getswitchinterval() == interval  # restored once nothing compiles
    assert GATE.busy() == {"work": 0, "background": 0}
    assert torch.equal(fn(three, scale=2.0), scaled(three, scale=2.0))
    assert fake.on(MAIN, key3) == 1  # compiled code from now on
    assert COMPILES.snapshot() == {
        "scheduled": 1, "compiled": 1, "failed": 0, "slow_first_calls": 0, "pending": 0
    }  # fmt: skip
    assert FALLBACKS.total() == 0


def test_outside_a_live_change_a_new_shape_compiles_in_line() -> None:
    """A stream's start (or any chunk not right after a live change): its shapes compile in line, so its first
    chunks run compiled code and get their graphs (TTFF and cold start measure this)."""
    fake, fn = _background_fn()
    fn(torch.ones(2), scale=2.0)
    fn(torch.ones(3), scale=2.0)
    assert not COMPILES.pending() and fake.on("compile-shapes") == 0
    assert fake.in_line == [_signature((torch.ones(3),), {"scale": 2.0})]
    with COMPILES.live_change():
        fake.release.set()
        fn(torch.ones(4), scale=2.0)
        assert COMPILES.wait(5) and fake.on("compile-shapes") == 1


@pytest.mark.usefixtures("live_change")
def test_a_plain_value_is_part_of_the_signature() -> None:
    fake, fn = _background_fn()
    x = torch.ones(2)
    fn(x, scale=2.0)
    fake.release.set()
    fn(x, scale=3.0)  # dynamo bakes Python scalars into the graph: a new signature
    assert COMPILES.wait(5)
    assert COMPILES.snapshot()["compiled"] == 1
    assert fake.on(MAIN) == 1 and fake.on("compile-shapes") == 1


@pytest.mark.usefixtures("live_change")
def test_a_failed_background_compile_is_recorded_and_that_shape_stays_eager() -> None:
    fake, fn = _background_fn()
    fake.fail = RuntimeError("BackendCompilerFailed: inductor raised LoweringException")
    fake.release.set()
    two, three = torch.ones(2, 3), torch.ones(3, 3)
    fn(two, scale=2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(fn(three, scale=2.0), scaled(three, scale=2.0))
        assert COMPILES.wait(5)
    assert FALLBACKS.snapshot()["counts"] == {"compile": 1}
    assert "test function (in the background)" in FALLBACKS.snapshot()["last"]["compile"]
    assert any("compile failed in test function" in str(w.message) for w in caught)
    for _ in range(2):
        assert torch.equal(fn(three, scale=2.0), scaled(three, scale=2.0))
    key3 = _signature((three,), {"scale": 2.0})
    assert fake.on(MAIN, key3) == 0  # eager for good: never compiled in line either
    fn(two, scale=2.0)
    assert fake.on(MAIN) == 2 and not fn.failed  # other signatures keep their compiled code
    assert COMPILES.snapshot()["failed"] == 1


@pytest.mark.usefixtures("live_change")
def test_out_of_memory_in_a_background_compile_is_not_a_failure_the_shape_compiles_in_line() -> None:
    fake, fn = _background_fn()
    fake.fail = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    fake.release.set()
    fn(torch.ones(2), scale=2.0)
    fn(torch.ones(3), scale=2.0)
    assert COMPILES.wait(5)
    assert FALLBACKS.total() == 0 and COMPILES.snapshot()["failed"] == 0
    fn(torch.ones(3), scale=2.0)  # as before there was a background: compiled on the calling thread
    assert fake.in_line == [_signature((torch.ones(3),), {"scale": 2.0})]


@pytest.mark.usefixtures("live_change")
def test_the_helper_runs_in_the_calling_threads_grad_mode() -> None:
    modes: list[tuple[str, bool, bool]] = []

    def eager(x: torch.Tensor) -> torch.Tensor:
        modes.append((threading.current_thread().name, torch.is_inference_mode_enabled(), x.is_inference()))
        return x

    fake = FakeCompiled(eager)
    fake.release.set()
    fn = CompiledOrEager(fake, eager, "modes", background=True)
    normal = torch.ones(3)  # made outside inference mode, as the KV cache's buffers may be
    with torch.inference_mode():
        fn(torch.ones(2))
        fn(normal)
    assert COMPILES.wait(5)
    # The helper in inference mode, its copy of `normal` a normal tensor: dynamo guards on both.
    assert ("compile-shapes", True, False) in modes


# --- StepGraphs -----------------------------------------------------------------------------------------


class WatchedGraphs(CpuGraphs):
    """CpuGraphs that log each finished warm-up run and each recording, with whether a compile was pending."""

    log: list[tuple[str, bool]]

    def _warm_up(self, run) -> None:
        for _ in range(2):
            run()
            self.log.append(("warm-up run", COMPILES.pending()))

    def _record(self, run):
        self.log.append(("record", COMPILES.pending()))
        return super()._record(run)


def _install(session, fakes: dict[str, FakeCompiled], log: list) -> WatchedGraphs:
    """The session's denoiser on compiled stand-ins (its KV-cache bookkeeping; the DiT's are installed once)."""
    d = session.denoiser
    d.cache._track = CompiledOrEager(fakes["track"], track, "KV-cache bookkeeping", background=True)
    d.graphs = WatchedGraphs(d.cache, d._step)
    d.graphs.log = log
    return d.graphs


def _push_all(session, clip: torch.Tensor, settle: bool) -> list[torch.Tensor]:
    outs = []
    for i in range(0, clip.shape[0], 4):
        outs.append(session.push(clip[i : i + 4]))
        if settle:  # let every background compile finish before the next chunk (the start: a fixed history)
            assert COMPILES.wait(10)
    return outs


def test_step_graphs_capture_a_new_lane_count_only_once_its_compiles_are_done(
    demo_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = moving_clip(81)
    start, later = clip[:25], clip[25:]

    def stream(optimised: bool) -> tuple[list[torch.Tensor], dict]:
        session = demo_pipeline.session(
            prompts=["a red fox"], batching="stream", steps=(700, 500), seed=5, **SMALL
        )
        release = threading.Event()
        release.set()
        fakes = {"first": FakeCompiled(dit_module._first_half, release),
                 "second": FakeCompiled(dit_module._second_half, release),
                 "track": FakeCompiled(track, release)}  # fmt: skip
        log: list[tuple[str, bool]] = []
        if optimised:
            dit = session.components.dit
            halves = (dit_module._first_half, dit_module._second_half)
            monkeypatch.setattr(dit, "_halves", tuple(
                CompiledOrEager(fakes[n], f, n, background=True) for n, f in zip(("first", "second"), halves)
            ))  # fmt: skip
            _install(session, fakes, log)
        outs = _push_all(session, start, settle=True)  # the start: 1 lane (chunk 0), then 2 (in line)
        start_in_line = {name: len(fake.in_line) for name, fake in fakes.items()}
        release.clear()  # from here on a new signature compiles until the test says so
        outs.append(session.update({"steps": [700, 500, 400]}))  # 3 lanes: new shapes for all three functions
        info: dict = {"fakes": fakes, "log": log, "start_in_line": start_in_line}
        if not optimised:
            return outs + _push_all(session, later, settle=False) + [session.flush()], info
        graphs = _install(session, fakes, log)
        pushes = iter(range(0, later.shape[0], 4))
        while not COMPILES.pending():  # the restarted stream's chunks, up to the first one with 3 lanes
            i = next(pushes)
            outs.append(session.push(later[i : i + 4]))
        before = (graphs.stats.captured, graphs.stats.deferred)
        for _ in range(6):  # until the lanes attend equal lengths (no mask): steps a graph could capture
            i = next(pushes)
            outs.append(session.push(later[i : i + 4]))
        assert fakes["first"].compiling.is_set() and COMPILES.pending()
        info["while_compiling"] = (graphs.stats.captured - before[0], graphs.stats.deferred - before[1])
        release.set()
        assert COMPILES.wait(10)
        outs += [session.push(later[i : i + 4]) for i in pushes] + [session.flush()]
        info["graphs"] = graphs.stats
        return outs, info

    eager, _ = stream(optimised=False)
    outs, info = stream(optimised=True)
    assert torch.equal(torch.cat(outs), torch.cat(eager))  # the same frames, whichever code ran them

    captured, deferred = info["while_compiling"]
    assert captured == 0 and deferred >= 1  # the chunks after the change ran uncaptured, without waiting
    # No recording and no finished warm-up run while anything compiled: the one warm-up that met the new shapes
    # stopped in its first run (and put the cache back: the frames above are the eager path's).
    assert info["log"] and not [entry for entry in info["log"] if entry[1]]
    stats = info["graphs"]
    assert stats.captured >= 1 and stats.replays >= 1 and stats.failed == 0  # captured once compiled
    for name, fake in info["fakes"].items():
        # The stream's start compiles its shapes in line; after the live change, nothing does.
        assert len(fake.in_line) == info["start_in_line"][name], name
        assert fake.on("compile-shapes") >= 1, name
    assert FALLBACKS.total() == 0 and COMPILES.snapshot()["slow_first_calls"] == 0


# --- through torch.compile ----------------------------------------------------------------------------


def _noting_backend(compiled_on: list[str], ran_on: list[str]):
    """A dynamo backend without code generation that notes the thread of each compile and of each call of the
    compiled code."""

    def backend(gm, example_inputs):
        compiled_on.append(threading.current_thread().name)

        def run(*args):
            ran_on.append(threading.current_thread().name)
            return gm.forward(*args)

        return run

    return backend


def _tiny_dit() -> WanDiT:
    torch.manual_seed(0)
    cfg = WanConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_len=8, text_dim=16, freq_dim=16)
    model = WanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval().requires_grad_(False)


@pytest.mark.usefixtures("live_change")
def test_torch_compile_the_helpers_compile_is_the_one_the_stream_uses() -> None:
    """Real dynamo (eager backend, so no C++ compiler): a 2-lane step after a 1-lane one compiles on the helper,
    from copies of the stream's arguments (views of the cache, inference and normal tensors), and the stream's
    later calls of that shape find it: nothing compiles again on the stream's thread. Outputs equal eager's."""
    import torch._dynamo

    compiled_on: list[str] = []  # the thread of each compile
    ran_on: list[str] = []  # the thread of each call of compiled code

    def compiled(fn):
        return torch.compile(fn, backend=_noting_backend(compiled_on, ran_on), dynamic=False)

    torch._dynamo.reset()
    model, reference = _tiny_dit(), _tiny_dit()
    model._halves = tuple(  # type: ignore[assignment]
        CompiledOrEager(compiled(f), f, f.__name__, background=True)
        for f in (dit_module._first_half, dit_module._second_half)
    )
    L = 2 * 3  # tokens per latent frame of a 4×6 latent
    cfg = KVCacheConfig(num_layers=2, num_heads=2, head_dim=16, frame_tokens=L, num_frames=6, lanes=2)
    cache, ref_cache = KVCache(cfg), KVCache(cfg)
    cache._track = CompiledOrEager(compiled(track), track, "bookkeeping", background=True)
    torch.manual_seed(1)
    ctx = torch.randn(1, 5, 16)
    chunks = [torch.randn(1, 2, 16, 4, 6)] + [torch.randn(2, 1, 16, 4, 6) for _ in range(4)]
    try:
        with torch.inference_mode():  # as the server's engine thread
            cross, ref_cross = model.cross_kv(ctx), reference.cross_kv(ctx)

            def step(i: int, x: torch.Tensor) -> None:
                starts = [0] if i == 0 else [(i + 1) * L, i * L]
                t = torch.full(x.shape[:2], 500)
                out = model.forward_stream(x, t, cross, cache, cache.plan(starts, x.shape[1]))
                ref = reference.forward_stream(x, t, ref_cross, ref_cache, ref_cache.plan(starts, x.shape[1]))
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

            step(0, chunks[0])  # the first signatures: compiled in line
            in_line = len(compiled_on)
            assert in_line >= 3 and set(compiled_on) == {MAIN}
            step(1, chunks[1])  # 2 lanes: compiled on the helper while this runs eagerly
            assert COMPILES.wait(30)
            ran_before = ran_on.count(MAIN)
            for i in (2, 3, 4):
                step(i, chunks[i])
                assert COMPILES.wait(30)
        for name in ("k", "v", "sink_k", "sink_v", "queue", "qhead", "qlen"):
            assert torch.equal(getattr(cache, name), getattr(ref_cache, name)), name  # copies, not the cache
        assert ran_on.count(MAIN) > ran_before  # 2-lane calls ran the helper's compiled code
        assert compiled_on[:in_line] == [MAIN] * in_line
        assert set(compiled_on[in_line:]) == {"compile-shapes"}  # every later compile on the helper
        assert COMPILES.snapshot()["compiled"] >= 3 and FALLBACKS.total() == 0
    finally:
        torch._dynamo.reset()


@pytest.mark.usefixtures("live_change")
def test_torch_compile_one_graph_serves_every_lane_count_from_two() -> None:
    """The lane dim marked dynamic (`lane_args`): after 1 lane (compiled in line) and 2 (on the helper), a
    live change to 3 and then 4 lanes and back — a steps change in stream batch — compiles nothing and runs
    the compiled code at once, equal to eager's."""
    import torch._dynamo

    compiled_on: list[str] = []
    ran_on: list[str] = []

    def compiled(fn):
        return torch.compile(fn, backend=_noting_backend(compiled_on, ran_on), dynamic=None)

    torch._dynamo.reset()
    model, reference = _tiny_dit(), _tiny_dit()
    model._halves = tuple(  # type: ignore[assignment]
        CompiledOrEager(compiled(f), f, f.__name__, background=True, lane_args=lanes)
        for f, lanes in ((dit_module._first_half, (1, 2, 3, 4)), (dit_module._second_half, (1, 2, 3)))
    )
    L = 2 * 3
    cfg = KVCacheConfig(num_layers=2, num_heads=2, head_dim=16, frame_tokens=L, num_frames=32, lanes=4)
    cache, ref_cache = KVCache(cfg), KVCache(cfg)
    cache._track = CompiledOrEager(
        compiled(track), track, "bookkeeping", background=True, lane_args=tuple(range(7))
    )
    torch.manual_seed(1)
    ctx = torch.randn(1, 5, 16)
    try:
        with torch.inference_mode():
            cross, ref_cross = model.cross_kv(ctx), reference.cross_kv(ctx)

            def step(i: int, lanes: int) -> None:
                x = torch.randn(lanes, 1, 16, 4, 6)
                starts = [(i + lanes - 1 - b) * L for b in range(lanes)]
                t = torch.full(x.shape[:2], 500)
                out = model.forward_stream(x, t, cross, cache, cache.plan(starts, 1))
                ref = reference.forward_stream(x, t, ref_cross, ref_cache, ref_cache.plan(starts, 1))
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

            step(0, 1)  # 1 lane: compiled in line
            for i in range(1, 4):  # 2 lanes: on the helper (the cache never fills here: one cache phase)
                step(i, 2)
                assert COMPILES.wait(30)
            compiles, scheduled, calls = len(compiled_on), COMPILES.snapshot()["scheduled"], len(ran_on)
            changes = (3, 3, 4, 4, 2)  # steps changed live, and back
            for i, lanes in enumerate(changes, start=4):
                step(i, lanes)
                assert not COMPILES.pending()
        assert len(compiled_on) == compiles and COMPILES.snapshot()["scheduled"] == scheduled  # none compiled
        assert len(ran_on) - calls == len(changes) * 3 * cfg.num_layers  # every call ran compiled code
        assert FALLBACKS.total() == 0 and COMPILES.snapshot()["slow_first_calls"] == 0
    finally:
        torch._dynamo.reset()


def test_a_compiled_call_while_another_thread_traces_runs_eager_openly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's "is FX tracing?" flag is process-wide: while a compile traces on another thread, dynamo would run a
    compiled function's eager code without a word. The wrapper does it openly instead, so a session log counts
    it (models/numerics.py); a replay waits for the tracing to end and runs the compiled code."""
    import torch.fx._symbolic_trace as fx_trace

    from wanstream.models import numerics

    fake, fn = _background_fn()
    x = torch.ones(2)
    fn(x, scale=2.0)  # compiled in line
    monkeypatch.setattr(fx_trace, "_is_fx_tracing_flag", True)
    with numerics.record() as ran:
        assert torch.equal(fn(x, scale=2.0), scaled(x, scale=2.0))
    assert fake.on(MAIN) == 1 and list(ran.eager.values()) == [[0]]  # eager, and noted: the site's first call
    release = threading.Timer(0.05, lambda: monkeypatch.setattr(fx_trace, "_is_fx_tracing_flag", False))
    release.start()
    with numerics.force({}):
        fn(x, scale=2.0)  # waits for the flag, then the compiled code
    release.join()
    assert fake.on(MAIN) == 2
