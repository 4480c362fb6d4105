"""Low-rank adapters on the DiT's linear layers (LoRA in "runtime" mode), and the layers they may target.

`LoraLinear` is an `nn.Linear` that shares the wrapped layer's weight and bias (so the state dict keeps
its names) — full width, or float8 with its row scales (`models.fp8`; the adapters stay in the compute
dtype) — and adds the adapters' low-rank path:

    y = W x + b + Σ_i c_i · B_i (A_i x),    c_i = scale_i · alpha_i / rank_i

All adapters of a layer are stacked along the rank: `down` [R, in] (the A_i), `up` [out, R] (the B_i)
and `scales` [R] (c_i repeated over adapter i's rows). The coefficients live in a tensor, so a scale
change is an in-place copy: compiled code and captured CUDA graphs read the new values with no
recompile or re-capture. Adding or removing an adapter changes the shapes (a new `LoraLinear`).

`LoraWeights` is a LoRA as tensors (`weights.lora` reads files into it; `engine.lora` puts it on the DiT).

Merged LoRAs need nothing here: they are folded into `weight` in place (see `wanstream.engine.lora`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wanstream.models import fp8


class LoraError(ValueError):
    """A LoRA that cannot be used; `keys` are the offending keys of the file (when keys are the problem)."""

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


@dataclass(frozen=True, eq=False)
class LoraPair:
    """One layer's adapter: ΔW = alpha / rank · up @ down (tensors as stored in the file, on the CPU)."""

    down: torch.Tensor  # A: [rank, in]
    up: torch.Tensor  # B: [out, rank]
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        """alpha / rank: what the pair is multiplied by at scale 1 (1 when the file has no alpha)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """alpha / rank · B·A in float32: the weight change at scale 1."""
        up = self.up.to(device=device, dtype=torch.float32)
        return (up @ self.down.to(device=device, dtype=torch.float32)).mul_(self.factor)


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A LoRA with every pair keyed by the DiT layer it adapts (e.g. 'blocks.0.self_attn.q')."""

    source: str  # where it came from (for messages)
    pairs: dict[str, LoraPair]
    naming: tuple[str, ...] = field(default=())  # the key spellings found: "wan", "diffusers", "kohya"

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({p.rank for p in self.pairs.values()}))

    def describe(self) -> str:
        ranks = "/".join(map(str, self.ranks))
        return f"{self.source}: {len(self.pairs)} layers, rank {ranks}, {'+'.join(self.naming)} names"


class LoraLinear(nn.Linear):
    def __init__(self, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, scales: torch.Tensor) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the parameters are the base layer's own
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.float8_compute = getattr(base, "float8_compute", False)
        rank = down.shape[0]
        if down.shape != (rank, self.in_features) or up.shape != (self.out_features, rank):
            raise ValueError(
                f"adapter shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a "
                f"[{self.out_features}, {self.in_features}] layer"
            )
        if scales.shape != (rank,):
            raise ValueError(f"scales must be [{rank}] (one per rank row), got {tuple(scales.shape)}")
        # Not persistent: the state dict stays the base model's.
        self.register_buffer("weight_scale", getattr(base, "weight_scale", None), persistent=False)
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = fp8.linear(x, self.weight, self.bias, self.weight_scale, float8_compute=self.float8_compute)
        return base + F.linear(F.linear(x, self.down) * self.scales, self.up)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}"


def linear_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer a LoRA may target: module name → weight shape (out, in)."""
    return {
        name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at `name` (e.g. 'blocks.3.ffn.0') in place of what is there; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)  # an existing key keeps its place (nn.Sequential order is unchanged)
    return old
