"""Weight-only float8 storage: matrices held as float8_e4m3fn with one scale per output row, computed in bf16.

This saves memory, not time: each call widens the float8 matrix back to the activations' dtype (pure torch,
any GPU and the CPU) and runs the usual bf16 GEMM. It is not float8 compute.

Per-row scaling puts each row's largest magnitude at float8's largest value (448), so every row uses the
whole float8 range whatever its size. Rounding to nearest with 3 mantissa bits makes each element's error
at most 2⁻⁴ of its magnitude (normal range), plus at most 2⁻¹⁰·scale for the tiny elements that fall in
float8's subnormal range (below 2⁻⁶·scale): |Ŵ − W| ≤ 2⁻⁴·|W| + 2⁻¹⁰·amax(row)/448, element by element.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# The per-element bound above, as used by the tests: relative part and absolute part (× row amax).
RELATIVE_ERROR = 2.0**-4
ABSOLUTE_ERROR_PER_AMAX = 2.0**-10 / FP8_MAX


def quantize_rows(weight: torch.Tensor, chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] (or [rows, dim]) → float8 values and float32 scales [out, 1]: weight ≈ values · scales.

    Works `chunk_rows` rows at a time, so a large table (umT5's 256k × 4096) never needs a float32 copy."""
    values = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scales = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        w = weight[start : start + chunk_rows].detach().float()
        amax = w.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        values[start : start + chunk_rows] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        scales[start : start + chunk_rows] = scale
    return values, scales


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 values · per-row scales, in `dtype` (scaled in float32, rounded once)."""
    return (values.float() * scale).to(dtype)


class Fp8Linear(nn.Linear):
    """An `nn.Linear` whose weight is stored in float8 with per-output-row scales; the bias stays as it was.

    Not an `nn.Linear` by type (`type(m) is nn.Linear` is False), so paths that read the weight directly
    (fused q/k/v, the GEMM-epilogue GELU) leave it alone and call it as a layer."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-width weight is allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        values, scale = quantize_rows(base.weight)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.bias = base.bias
        # Not persistent: the state dict keeps the official names and shapes.
        self.register_buffer("weight_scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight=float8_e4m3fn per-row scaled"


def quantize_linears_(root: nn.Module, include: Callable[[str], bool] = lambda _name: True) -> int:
    """Replace every `nn.Linear` under `root` whose name passes `include` by an `Fp8Linear`, one layer at a
    time on its own device (peak: one full-width matrix). Returns how many were replaced."""
    names = [
        name
        for name, m in root.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, Fp8Linear) and name and include(name)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, Fp8Linear(getattr(parent, child)))
    return len(names)


def quantize_embedding_(embedding: nn.Embedding) -> None:
    """Store a lookup table in float8 with one scale per row (read back with `embedding_rows`)."""
    values, scale = quantize_rows(embedding.weight)
    embedding.weight = nn.Parameter(values, requires_grad=False)
    embedding.register_buffer("weight_scale", scale, persistent=False)


def embedding_rows(embedding: nn.Embedding, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the table in `dtype`: gathered first, then widened (and scaled when stored in float8)."""
    rows = embedding.weight[ids]
    scale = getattr(embedding, "weight_scale", None)
    if scale is None:
        return rows.to(dtype)
    return dequantize(rows, scale[ids], dtype)


def is_fp8(module: nn.Module) -> bool:
    """True when any of `module`'s parameters is stored in float8."""
    return any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in module.parameters())


def dit_to_fp8_(dit: nn.Module) -> int:
    """The DiT's transformer blocks' linear layers (self/cross-attention projections, FFN) to float8 storage.

    Attention itself, norms, modulation, the patch / text / time embeddings and the head stay as they are."""
    return quantize_linears_(dit, lambda name: name.startswith("blocks."))
