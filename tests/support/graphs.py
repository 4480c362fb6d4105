"""CUDA-graph capture on the CPU, for tests of `StepGraphs`.

The device side of `StepGraphs` (warm-up on the capture stream, recording) is replaced by a stand-in that
records the step as a closure and replays it by running it: the engine's bookkeeping around it — keys, static
buffers, cache save/restore, deferral, fallback — is the code that runs on the GPU."""

from __future__ import annotations

from wanstream.engine.graphs import StepGraphs


class _Replay:
    """A 'graph' that replays by running the recorded step into the static outputs."""

    def __init__(self, run, outputs) -> None:
        self.run, self.outputs = run, outputs

    def replay(self) -> None:
        for dst, src in zip(self.outputs, self.run()):
            dst.copy_(src)


class CpuGraphs(StepGraphs):
    device_type = "cpu"
    fail_with: BaseException | None = None

    def _warm_up(self, run) -> None:
        for _ in range(2):
            run()

    def _record(self, run):
        if self.fail_with is not None:
            raise self.fail_with
        # CUDA records without running; this stand-in runs the step, so it puts the cache back itself.
        saved = {name: buf.clone() for name, buf in self.cache.state()["buffers"].items()}
        outputs = tuple(o.clone() for o in run())
        self._restore(saved)
        return _Replay(run, outputs), outputs


class FailingGraphs(CpuGraphs):
    fail_with = RuntimeError(
        "CUDA error: operation failed due to a previous error during capture (cudaErrorStreamCaptureInvalidated)"
    )
