"""The networks a log was made with, built again: the demo, full-size random weights, or the real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wanstream.pipeline import Pipeline


def pipeline_for(
    model: dict[str, Any],
    *,
    models_dir: str | Path | None = None,
    device: str | None = None,
    lora_dir: str | Path | None = None,
) -> Pipeline:
    """A pipeline like the one in `model` (a log's model identity) on `device` (default: the log's kind —
    CUDA when the take ran on a GPU and one is here, else the CPU). LoRA names resolve in `lora_dir`."""
    from wanstream.weights.lora import LoraFiles

    if device is None:
        device = (
            "cuda"
            if str(model.get("device", "cpu")).startswith("cuda") and torch.cuda.is_available()
            else "cpu"
        )
    dtype = getattr(torch, str(model.get("dtype", "float32")))
    # cuDNN's conv algorithms chosen as the take's were: timed (that process's choice, which this one may not
    # repeat) or by heuristics (the same in every process: `serve --reproducible-takes`).
    reproducible = model.get("cudnn_benchmark") is False
    if model.get("demo"):
        pipe = Pipeline.demo(device=device, dtype=dtype, seed=int(model.get("weights_seed") or 0))
    elif model.get("random_weights"):
        placement = str(model.get("text_placement", "auto"))
        pipe = Pipeline.random_weights(
            device,
            text_encoder=None if placement == "none" else placement,  # "none": the take set embeddings
            precision=str(model.get("precision", "bf16")),
            tiny=bool(model.get("tiny", False)),
            reproducible=reproducible,
        )
    else:
        pipe = Pipeline.load(
            models_dir,
            device=device,
            dtype=dtype,
            text_encoder=str(model.get("text_placement", "auto")),
            precision=str(model.get("precision", "bf16")),
            vace="vace" in model.get("files", {}),
            reproducible=reproducible,
        )
    if lora_dir is not None:
        pipe.components.lora_source = LoraFiles(lora_dir)
    return pipe
