"""The loaded networks a session runs on: shared, stateless, built once per process."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from wanstream.models import compile_settings
from wanstream.models.dit import WanDiT
from wanstream.models.scheduler import FlowMatchScheduler


class TextEncoderLike(Protocol):
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, 512, 4096] embeddings, rows past each prompt's length zeroed."""
        ...


@dataclass
class Components:
    dit: WanDiT
    device: torch.device
    dtype: torch.dtype
    wan_vae: torch.nn.Module | None = None  # wanstream.models.vae.WanVAE
    taehv: torch.nn.Module | None = None  # wanstream.models.tae.TAEHV
    text_encoder: TextEncoderLike | None = None
    vace: torch.nn.Module | None = None  # wanstream.models.vace (optional conditioning module)
    loras: Any = None  # wanstream.engine.lora.LoraManager (adapters on the DiT), when any are loaded
    lora_source: Any = None  # engine.lora.LoraSource: where LoRA names load from (weights.lora.LoraFiles)
    scheduler: FlowMatchScheduler = field(default_factory=FlowMatchScheduler)
    label: str = ""  # e.g. "StreamDiffusionV2 1.3B" or "demo (random weights)"
    random_weights: bool = False  # full-size networks with random weights (measuring; output is noise)
    demo: bool = False  # the tiny random-weight demo (its toy tokenizer and sizes stand in for the real ones)
    tiny: bool = False  # random networks at the benchmark's tiny sizes (`random_components(tiny=True)`)
    optimized: bool = (
        False  # set by `optimize()`: sessions compile their cache bookkeeping and use CUDA graphs
    )
    precision: str = "bf16"  # "fp8": the DiT blocks' linear weights in float8 (`models.placement`)
    text_placement: str = "gpu"  # where the text encoder lives: "gpu", "host" (parked) or "fp8" (on the GPU)
    # Where the weights came from, for a session log's model identity: role → file path (the real model), or
    # the seed of random weights (the demo; full-size random networks use fixed seeds).
    files: dict[str, str] = field(default_factory=dict)
    weights_seed: int | None = None

    def optimize(self, *, compile: bool = True, vae: bool = True, reproducible: bool = False) -> Components:
        """GPU speed-ups that keep the arithmetic: fused q/k/v and regional compilation of the DiT blocks,
        channels-last and compiled VAE; sessions created afterwards compile their cache bookkeeping and
        replay CUDA graphs. First calls of each shape compile (tens of seconds; cached on disk, so later
        processes start quickly). `reproducible`: cuDNN picks conv algorithms by its heuristics instead of
        timing them in this process — the same in every process, which removes one cause of a take replaying
        otherwise in another process, at 13 ms a chunk at 480×832 on an H100 (call 27) — and Inductor's kernels
        take their first launch configuration instead of the fastest one timed in this process (on torch 2.11
        its deterministic mode alone did not stop the timing: docs/benchmarks.md, calls 47–50; the choice by
        order is not yet measured on a GPU: its speed, and whether a new process then replays bit for bit)."""
        if self.device.type != "cuda":
            return self
        # cuDNN picks each conv's fastest engine by timing it once per shape (the VAE's convs are most of a
        # chunk); `bench` ran with this on, so `generate` and `serve` must too to see its figures. Another
        # process may time them otherwise and pick another engine, which rounds differently.
        torch.backends.cudnn.benchmark = not reproducible
        if reproducible:
            # Inductor times its kernels' launch configurations at their first run and keeps the fastest: a
            # choice of this process (and of each compile), which changes a reduction's rounding. Its
            # deterministic mode is asked for, and — as that alone did not hold on torch 2.11 (calls 47-50) —
            # every kernel takes its first configuration (compile_settings.launch_configs_by_order).
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config, "deterministic"):  # on every thread that compiles (compile_settings)
                compile_settings.want("torch._inductor.config", "deterministic", True)
            if not compile_settings.launch_configs_by_order():  # the take's identity records it
                warnings.warn(
                    f"torch {torch.__version__}: Inductor's launch configurations cannot be chosen without "
                    "timing them, so a take may round otherwise in another process",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.dit.optimize(compile=compile)
        if self.vace is not None:  # its blocks run the DiT's compiled block halves; fuse their q/k/v too
            self.vace.optimize()  # type: ignore[operator]
        if vae and self.wan_vae is not None:
            self.wan_vae.optimize(channels_last=True, compile=compile)  # type: ignore[operator]
        self.optimized = compile
        return self
