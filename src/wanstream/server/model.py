"""The loaded pipeline: loaded once per process on a background thread, with its progress on show."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wanstream.models.placement import check_precision
from wanstream.server.schemas import ModelStatus

if TYPE_CHECKING:
    from wanstream.engine.settings import StreamSettings
    from wanstream.pipeline import Pipeline

log = logging.getLogger("wanstream.server")


class ModelBusy(RuntimeError):
    pass


class ModelManager:
    """State machine not_loaded → loading → loaded | error; thread-safe status reads."""

    def __init__(
        self,
        *,
        demo: bool,
        models_dir: Path | None,
        device: str | None,
        vace: bool = True,
        gpus: int = 1,
        random_weights: bool = False,
        text_encoder: str = "auto",
        precision: str = "bf16",
        random_size: str = "full",
        reproducible: bool = False,
        warm_up: Callable[[Pipeline], Sequence[StreamSettings]] | None = None,
    ) -> None:
        self.demo = demo
        # The settings of the private streams run after loading, before the model is "loaded": their compiles
        # happen then, not in the first client's first frames (engine/warm_up.py). None: no warm-up.
        self.warm_up = warm_up
        self.random_weights = random_weights  # full-size networks, random weights (measuring the live path)
        self.random_size = random_size  # "tiny": the benchmark's tiny random networks (tests)
        self.text_encoder = text_encoder  # umT5 placement (docs/memory.md)
        self.precision = precision
        self.reproducible = reproducible  # no timed kernel choices (Pipeline.load; docs/replay.md)
        self.gpus = gpus  # > 1: the DiT over a ring of GPUs (one stream at a time)
        self.vace = vace  # load the VACE module with the real weights when it is downloaded
        self.models_dir = models_dir
        self.device = device
        self._lock = threading.Lock()
        self._state = "not_loaded"
        self._stage = ""
        self._progress: float | None = 0.0  # None while loading: the loader reports stages, not fractions
        self._error: str | None = None
        self._download_command: str | None = None
        self._started: float | None = None
        self._finished: float | None = None
        self._pipeline: Pipeline | None = None
        self._thread: threading.Thread | None = None

    @property
    def pipeline(self) -> Pipeline | None:
        pipeline = self._pipeline
        if pipeline is not None and _ring_down(pipeline):
            return None  # a multi-GPU ring that lost a rank serves nothing until the model is reloaded
        return pipeline

    def status(self) -> ModelStatus:
        with self._lock:
            pipeline = self._pipeline
            elapsed = None
            if self._started is not None:
                elapsed = (self._finished or time.monotonic()) - self._started
            down = _ring_down(pipeline) if pipeline is not None else None
            return ModelStatus(
                state="error" if down else self._state,  # type: ignore[arg-type]
                stage=self._stage,
                progress=self._progress,
                label=pipeline.label if pipeline is not None else "",
                device=str(pipeline.components.device) if pipeline is not None else (self.device or ""),
                error=down or self._error,
                elapsed_s=None if elapsed is None else round(elapsed, 3),
                demo=pipeline.is_demo if pipeline is not None else self.demo,
                random_weights=self.random_weights,
                text_encoder=pipeline.components.text_placement if pipeline is not None else "",
                # Before a load (or after a failed one): what the next load uses.
                precision=pipeline.components.precision if pipeline is not None else self.precision,
                codecs=_codecs(pipeline),
                download_command=self._download_command,
                vace=pipeline is not None and pipeline.components.vace is not None,
            )

    def not_ready_reason(self) -> str:
        """Why no stream can start yet, in words (for 503 answers)."""
        status = self.status()
        if status.state == "loading":
            return f"the model is still loading ({status.stage}); poll GET /api/v1/model"
        if status.state == "error":
            return f"the model failed to load: {status.error}"
        return "no model is loaded: POST /api/v1/model/load"

    def start_load(self, *, demo: bool | None = None, precision: str | None = None) -> None:
        """Begin loading in the background (returns at once); a second call while loading is refused.
        `demo`, `precision`: for this load and the next ones (None: as before)."""
        with self._lock:
            if self._state == "loading":
                raise ModelBusy("the model is already loading; poll GET /api/v1/model")
            if demo is not None:
                self.demo = demo
            if precision is not None:
                self.precision = check_precision(precision)
            self._state, self._stage, self._progress, self._error = "loading", "starting", None, None
            self._download_command = None
            self._started, self._finished = time.monotonic(), None
            previous, self._pipeline = self._pipeline, None
            if previous is not None:
                previous.close()  # a multi-GPU ring stops its processes (one ring per process)
            self._thread = threading.Thread(target=self._load, name="wanstream-model-load", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Release the model's processes (a multi-GPU ring); the server calls this at shutdown."""
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.close()

    def wait(self, timeout: float | None = None) -> ModelStatus:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    def _set_stage(self, stage: str) -> None:
        with self._lock:
            self._stage = stage

    def _load(self) -> None:
        try:
            from wanstream.pipeline import Pipeline

            if self.gpus > 1:
                self._set_stage(f"starting {self.gpus} GPU processes and loading their parts of the model")
                pipeline = Pipeline.parallel(
                    self.gpus,
                    demo=self.demo,
                    models_dir=self.models_dir,
                    device="cpu" if self.device == "cpu" else "cuda",
                )
            elif self.random_weights and not self.demo:
                self._set_stage("building full-size networks with RANDOM weights (no download)")
                pipeline = Pipeline.random_weights(
                    device=self.device,
                    text_encoder=self.text_encoder,
                    precision=self.precision,
                    tiny=self.random_size == "tiny",
                    reproducible=self.reproducible,
                )
            elif self.demo:
                self._set_stage("building the demo model (tiny, random weights)")
                pipeline = Pipeline.demo(device=self.device)
                if not self.vace:
                    pipeline.components.vace = None
            else:
                self._set_stage("loading weights")
                # VACE when its file is downloaded (Scope's vace_enabled defaults on): sessions opt in.
                pipeline = Pipeline.load(
                    self.models_dir,
                    device=self.device,
                    text_encoder=self.text_encoder,
                    precision=self.precision,
                    vace="auto" if self.vace else False,
                    progress=self._set_stage,
                    reproducible=self.reproducible,
                )
        except Exception as exc:
            log.exception("model load failed")
            with self._lock:
                self._state, self._error = "error", f"{type(exc).__name__}: {exc}"
                self._download_command = _download_command(exc)
                self._finished = time.monotonic()
            return
        if pipeline.components.device.type == "cpu":
            _leave_a_core_for_media()
        if self.warm_up is not None and compiles_at_stream_start(pipeline):
            self._warm_up(pipeline)
        with self._lock:
            self._pipeline = pipeline
            self._state, self._stage, self._progress = "loaded", "ready", 1.0
            self._finished = time.monotonic()
        log.info("model loaded: %s", pipeline.label)

    def _warm_up(self, pipeline: Pipeline) -> None:
        """Never fatal: whatever fails here (the settings included), the model loads and the first client's
        stream compiles as it starts instead."""
        assert self.warm_up is not None
        try:
            streams = self.warm_up(pipeline)
            for i, settings in enumerate(streams):
                steps = len(settings.denoising_steps)
                self._set_stage(
                    f"compiling: a first stream at {settings.width}x{settings.height}, {steps} "
                    f"step{'s' * (steps > 1)}"
                    + (f" ({i + 1} of {len(streams)})" if len(streams) > 1 else "")
                    + " — about a minute with an empty compile cache, seconds after"
                )
                done = pipeline.warm_up(settings)
                log.info("warmed up at %d steps: %d chunks in %.1f s", steps, done.chunks, done.seconds)
        except Exception as exc:
            log.warning(
                "the warm-up stream failed (%s: %s); streams compile as they start", type(exc).__name__, exc
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory warm-up leaves nothing behind


def compiles_at_stream_start(pipeline: Pipeline) -> bool:
    """Whether a stream's first chunks compile anything: the optimised path on one GPU (a multi-GPU ring's
    ranks compile in their own processes; the CPU path is not compiled)."""
    return pipeline.components.optimized and pipeline.ring is None


def _ring_down(pipeline: Pipeline) -> str | None:
    """Why a multi-GPU ring cannot serve any more (a rank died or hung), or None."""
    ring = pipeline.ring
    if ring is None or ring.broken is None:
        return None
    return f"the multi-GPU ring is down: {ring.broken}; reload the model (POST /api/v1/model/load)"


def _codecs(pipeline: Pipeline | None) -> list[str]:
    if pipeline is None:
        return []
    c = pipeline.components
    return [name for name, module in (("wan", c.wan_vae), ("taehv", c.taehv)) if module is not None]


def _download_command(exc: BaseException) -> str | None:
    """The `wanstream download ...` command a missing-weights error carries (for the studio to show)."""
    from wanstream.weights.store import MissingWeightsError

    return exc.command if isinstance(exc, MissingWeightsError) else None


def _leave_a_core_for_media() -> None:
    """On a CPU the engine shares the cores with video decoding/encoding and the event loop. Torch's
    intra-op threads spin at their barriers; when another thread takes one of their cores, every parallel
    op waits for it (measured on 2 cores: a 256×256 chunk took 7 s with 2 threads, 0.6 s with 1)."""
    cores = os.cpu_count() or 1
    threads = max(1, min(torch.get_num_threads(), cores - 1))
    torch.set_num_threads(threads)
    log.info(
        "CPU engine: %d torch thread(s), leaving the rest of %d core(s) to the media path", threads, cores
    )
