"""`Pipeline`: load the networks once, open as many stream sessions as you like.

from wanstream import Pipeline
pipe = Pipeline.load()                       # the real model from `wanstream download`
# pipe = Pipeline.demo()                     # tiny random weights: the whole path, no download
session = pipe.session(height=480, width=832, prompts=["a watercolor painting of a city at night"])
out = session.push(frames)                   # uint8 [T, H, W, 3] in, uint8 frames out as they are ready
out = torch.cat([out, session.flush()])      # end of input: drain what is still in flight
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from wanstream.engine.components import Components
from wanstream.engine.journal import SessionJournal
from wanstream.engine.prompts import DEFAULT_PROMPT, WeightedPrompt
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.engine.warm_up import WarmUp, warm_up
from wanstream.weights.lora import LoraFiles

Progress = Callable[[str], None]

RANDOM_LABEL = (
    "full-size networks, RANDOM WEIGHTS (serve --random-weights: for measuring; the output is noise)"
)

# The low-memory profile (`--low-vram`, docs/memory.md): what Pipeline.load and the stream settings use.
LOW_VRAM_LOAD = {"text_encoder": "host", "precision": "fp8"}
LOW_VRAM_SETTINGS = {"encoder": "taehv", "decoder": "taehv"}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    def __init__(self, components: Components, ring: Any = None) -> None:
        self.components = components  # with a ring: rank 0's share of the networks
        self.ring = ring  # wanstream.parallel.Ring when the DiT runs over several GPUs
        if components.lora_source is None:
            # LoRA names: file paths, or names in WANSTREAM_LORA_DIR (the server confines them per stream).
            # No manager yet: a stream without LoRAs never takes its lock.
            components.lora_source = LoraFiles.from_env()

    @property
    def label(self) -> str:
        return self.ring.label if self.ring is not None else self.components.label

    @property
    def is_demo(self) -> bool:
        from wanstream.engine.random_weights import DEMO_LABEL

        return self.components.label == DEMO_LABEL

    @classmethod
    def demo(
        cls, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> Pipeline:
        """Tiny random-weight networks: exercises every code path in seconds. Output is not meaningful."""
        from wanstream.engine.random_weights import demo_components

        return cls(demo_components(device or "cpu", dtype, seed))

    @classmethod
    def random_weights(
        cls,
        device: str | torch.device | None = None,
        *,
        text_encoder: str | None = "auto",
        precision: str = "bf16",
        tiny: bool = False,
        optimize: bool = True,
        reproducible: bool = False,
    ) -> Pipeline:
        """Full-size networks with RANDOM weights (no download): the real model's work and memory, noise for
        output — for measuring (`serve --random-weights`, tools/gpu/live_path.py). `tiny`: the benchmark's
        tiny random networks. `text_encoder=None`: none (prompts must come as embeddings). Labelled
        `RANDOM_LABEL` everywhere it is shown. `reproducible`: as in `load`."""
        from wanstream.engine.random_weights import random_components

        dev = torch.device(device) if device is not None else default_device()
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        components = random_components(dev, dtype, tiny, precision=precision, text_encoder=text_encoder)
        components.label = RANDOM_LABEL
        components.random_weights = True
        if optimize:
            components.optimize(reproducible=reproducible)
        return cls(components)

    @classmethod
    def load(
        cls,
        models_dir: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        text_encoder: str = "auto",
        text_encoder_file: str = "auto",
        precision: str = "bf16",
        low_vram: bool = False,
        taehv: bool = True,
        vace: bool | Literal["auto"] = False,
        progress: Progress | None = None,
        optimize: bool = True,
        reproducible: bool = False,
    ) -> Pipeline:
        """The real StreamDiffusionV2 1.3B pipeline from local files (fails fast, naming the download
        command, when files are missing; never downloads). On a GPU, `optimize` (the default) fuses and
        compiles the networks (`Components.optimize`): the first chunk of each shape compiles, cached on
        disk for later starts; it does nothing on the CPU. `reproducible`: conv algorithms and kernel
        configurations chosen the same way in every process, not timed, a little slower (`Components.optimize`;
        docs/replay.md says what that does and does not make bit for bit). `vace`: also the VACE module (True: its file
        is required, "auto": when downloaded).

        Memory (docs/memory.md): `text_encoder` places the umT5 — "gpu", "fp8" (float8 weights on the GPU)
        or "host" (pinned host memory, streamed in per new prompt); "auto" is "host" on a GPU.
        `text_encoder_file`: which downloaded encoder file to read ("auto", "bf16", "fp8").
        `precision="fp8"` stores the DiT blocks' linear weights in float8: half their memory, and on a GPU with
        float8 GEMMs (compute capability ≥ 8.9) the layers measured faster also compute in float8.
        `low_vram=True` is the low-memory profile: text encoder "host" and DiT "fp8" (and TAEHV, which
        the session settings choose: `LOW_VRAM_SETTINGS`)."""
        from wanstream.weights.pipeline import load_networks

        if low_vram:
            text_encoder, precision = LOW_VRAM_LOAD["text_encoder"], LOW_VRAM_LOAD["precision"]
        dev = torch.device(device) if device is not None else default_device()
        networks = load_networks(
            models_dir,
            device=dev,
            dtype=dtype,
            text_encoder=text_encoder,
            text_encoder_file=text_encoder_file,
            precision=precision,
            taehv=taehv,
            vace=vace,
            progress=progress,
        )
        components = Components(device=dev, dtype=dtype, **vars(networks))  # weights meet the engine here
        if optimize:
            components.optimize(reproducible=reproducible)
        return cls(components)

    @classmethod
    def parallel(
        cls,
        gpus: int,
        *,
        demo: bool = False,
        models_dir: str | Path | None = None,
        device: Literal["cuda", "cpu"] = "cuda",
        optimize: bool = True,
        timeout_s: float = 60.0,
        rebalance_after: int | None = None,
    ) -> Pipeline:
        """One stream over `gpus` GPUs: the DiT's blocks split into a ring of processes, one per GPU
        (docs/multigpu.md). `device="cpu"`: CPU processes over gloo (tests, no GPU needed). `demo`: the
        tiny random-weight model (with at least one block per rank). Call `close()` when done."""
        from wanstream.parallel import ModelSource, Ring

        if demo:
            source = ModelSource("demo", num_layers=max(2, gpus))
        else:
            dtype = "bfloat16" if device == "cuda" else "float32"
            models = str(models_dir) if models_dir is not None else None
            source = ModelSource(
                "files", models_dir=models, dtype=dtype, optimize=optimize and device == "cuda"
            )
        ring = Ring.start(source, gpus, device=device, timeout_s=timeout_s, rebalance_after=rebalance_after)
        return cls(ring.components, ring=ring)

    def close(self) -> None:
        """Stop a multi-GPU ring's processes (nothing to do for one GPU)."""
        if self.ring is not None:
            self.ring.close()

    def warm_up(self, settings: StreamSettings | None = None, **overrides: Any) -> WarmUp:
        """Run a private stream at these settings (as `session` takes them) until its cache is full, and close
        it: the compiles, cuDNN's choices and the GPU libraries' first uses of a stream's start happen now,
        not in the first real stream's first frames (`engine/warm_up.py`). `serve` does this while it loads."""
        base = _with_overrides(settings, overrides)
        return warm_up(lambda: self.session(base, prompts=DEFAULT_PROMPT), base)

    def session(
        self,
        settings: StreamSettings | None = None,
        *,
        prompts: Sequence[WeightedPrompt | str] | WeightedPrompt | str | None = None,
        log: bool | SessionJournal = False,
        **overrides: Any,
    ) -> StreamSession:
        """A new stream. `overrides` are StreamSettings fields (validated), e.g. height=512, steps=(700,).
        `log`: keep a journal of the stream (`session.log()`, saved with `wanstream.takes.save_log` and run
        again bit for bit by `wanstream replay`; docs/replay.md)."""
        base = _with_overrides(settings, overrides)
        if self.ring is not None:
            if log:
                raise ValueError("session logs are not kept for multi-GPU streams yet (log=False)")
            return self.ring.session(base, prompts=prompts)
        return StreamSession(self.components, base, prompts=prompts, log=log)


def _with_overrides(settings: StreamSettings | None, overrides: dict[str, Any]) -> StreamSettings:
    """`settings` (default: the defaults) with StreamSettings fields overridden, validated."""
    base = settings or StreamSettings()
    return StreamSettings.model_validate({**base.model_dump(), **overrides}) if overrides else base
