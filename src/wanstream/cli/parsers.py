"""Command-line spellings of prompts, LoRAs and timesteps, parsed into the engine's types.

Each raises `GenerateError` naming the flag's value, so `wanstream generate` exits with code 2 (bad input).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import ValidationError

from wanstream.engine.prompts import WeightedPrompt
from wanstream.engine.settings import LoraSpec
from wanstream.jobs.generate import GenerateError

if TYPE_CHECKING:
    import torch

_PROMPT_WEIGHT = re.compile(r"^(?P<text>.*\S)\s*:\s*(?P<weight>\d+(?:\.\d*)?|\.\d+)$", re.DOTALL)


def parse_prompt(spec: str) -> WeightedPrompt:
    """`TEXT` or `TEXT:WEIGHT` (a trailing `:NUMBER` is the weight; add `:1` to keep one in the text)."""
    match = _PROMPT_WEIGHT.match(spec)
    try:
        if match:
            return WeightedPrompt(text=match["text"], weight=float(match["weight"]))
        return WeightedPrompt(text=spec)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise GenerateError(f"prompt {spec!r}: {reason}") from None


_LORA_SCALE = re.compile(r"^(?P<path>.+):(?P<scale>[-+]?(?:\d+(?:\.\d*)?|\.\d+))$")


def parse_lora(spec: str) -> LoraSpec:
    """`FILE` or `FILE:SCALE` (a trailing `:NUMBER`, possibly negative, is the scale; default 1)."""
    match = _LORA_SCALE.match(spec)
    try:
        if match:
            return LoraSpec(path=match["path"], scale=float(match["scale"]))
        return LoraSpec(path=spec)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise GenerateError(f"--lora {spec!r}: {reason}") from None


def parse_steps(spec: str) -> tuple[int, ...]:
    """'700,500' → (700, 500) (validated later, with the other settings)."""
    try:
        return tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise GenerateError(f"steps {spec!r}: give comma-separated whole timesteps, e.g. 700,500") from None


def parse_device(name: str | None) -> torch.device:
    """`--device`: a torch device this machine has (None: CUDA when available, else the CPU)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name!r}: not a torch device (e.g. cuda, cuda:1, cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: CUDA is not available here")
    return device
