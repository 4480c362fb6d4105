"""Float8 DiT weights: matrices held as float8_e4m3fn with one scale per output row; on a GPU with float8
tensor cores, the layers where it is faster also compute in float8.

Storage (every `Fp8Linear`): half a bf16 matrix's memory. Where a layer does not compute in float8 (the CPU,
a GPU without float8 GEMMs, layers where float8 was measured slower), each call widens the matrix back to
the activations' dtype (pure torch) and runs the usual GEMM: memory, not speed.

Compute (`float8_compute`, bf16 activations on a CUDA GPU of compute capability ≥ 8.9): each call scales
every activation row (token) to float8's range and runs one rowwise-scaled float8 GEMM (`torch._scaled_mm`,
float32 accumulation, bf16 out): y = (x_q · s_x) (W_q · s_w)ᵀ + b. Under `torch.compile` the activation's
amax / scale / cast fuse into the kernel that made it (the modulated norm, the GELU): an unfused
quantisation made every float8 layer slower than bf16 (issue "Performance II": 0.937 vs 0.334 ms a block).
Written here rather than with torchao's float8 tensor subclass: one function over the storage above (which
the weight-only path, merged LoRAs and the fused q/k/v share), no dependency pinned to a torch version.

Per-row scaling puts each row's largest magnitude at float8's largest value (448), so every row uses the
whole float8 range whatever its size. Rounding to nearest with 3 mantissa bits makes each element's error
at most 2⁻⁴ of its magnitude (normal range), plus at most 2⁻¹⁰·scale for the tiny elements that fall in
float8's subnormal range (below 2⁻⁶·scale): |Ŵ − W| ≤ 2⁻⁴·|W| + 2⁻¹⁰·amax(row)/448, element by element.
The activations' rows get the same bound.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# The per-element bound above, as used by the tests: relative part and absolute part (× row amax).
RELATIVE_ERROR = 2.0**-4
ABSOLUTE_ERROR_PER_AMAX = 2.0**-10 / FP8_MAX
# The DiT block layers that compute in float8 where the GPU can: measured per layer on an H100 at 2 lanes ×
# 1,560 tokens (issue "Performance II"; bf16 → float8 ms): fused q/k/v 0.062 → 0.040, FFN up 0.117 → 0.080,
# FFN down 0.108 → 0.071. The 1536×1536 projections (self-attention out, cross-attention q and out) were
# slower in float8 and keep bf16 arithmetic; cross-attention k / v run once per prompt.
FLOAT8_COMPUTE_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "ffn.0", "ffn.2")
FLOAT8_GEMM_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell


def quantize_rows(weight: torch.Tensor, chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] (or [rows, dim]) → float8 values and float32 scales [out, 1]: weight ≈ values · scales.

    Works `chunk_rows` rows at a time, so a large table (umT5's 256k × 4096) never needs a float32 copy."""
    values = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scales = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk_rows):
        rows = weight[start : start + chunk_rows].detach()
        values[start : start + chunk_rows], scales[start : start + chunk_rows] = _to_float8(rows)
    return values, scales


def _to_float8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `rows` [..., dim] scaled so its amax is float8's largest value (an all-zero row: scale 1)."""
    w = rows.float()
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 values · per-row scales, in `dtype` (scaled in float32, rounded once)."""
    return (values.float() * scale).to(dtype)


def float8_matmul(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] (bf16) @ (values · scale)ᵀ in float8 on the tensor cores: every row of x scaled to
    float8 on its own, one rowwise-scaled GEMM, float32 accumulation, bf16 out [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    x_values, x_scale = _to_float8(rows)
    # values [out, in] row-major: its transpose is the column-major [in, out] the GEMM wants, no copy.
    out = torch._scaled_mm(
        x_values, values.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16
    )
    return out.reshape(*x.shape[:-1], values.shape[0])


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    *,
    float8_compute: bool = False,
) -> torch.Tensor:
    """`F.linear` for a weight as stored here: full width (`scale` None), or float8 values with per-row
    scales — computed in float8 when `float8_compute` and x is bf16, else widened to x's dtype."""
    if scale is None:
        return F.linear(x, weight, bias)
    bias = None if bias is None else bias.to(x.dtype)
    if float8_compute and x.dtype == torch.bfloat16:
        out = float8_matmul(x, weight, scale)
        return out if bias is None else out + bias  # the add fuses into the next kernel under compile
    return F.linear(x, dequantize(weight, scale, x.dtype), bias)


class Fp8Linear(nn.Linear):
    """An `nn.Linear` whose weight is stored in float8 with per-output-row scales; the bias stays as it was.

    Not an `nn.Linear` by type (`type(m) is nn.Linear` is False), so paths that read the weight directly
    (the GEMM-epilogue GELU) leave it alone and call it as a layer. `float8_compute`: see the module's
    docstring; `compute_dtype`: the dtype the layer was loaded in (its activations' and adapters')."""

    def __init__(self, base: nn.Linear, *, float8_compute: bool = False) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-width weight is allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype = base.weight.dtype
        self.float8_compute = float8_compute
        values, scale = quantize_rows(base.weight)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.bias = base.bias
        # Not persistent: the state dict keeps the official names and shapes.
        self.register_buffer("weight_scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_scale, float8_compute=self.float8_compute)

    def extra_repr(self) -> str:
        arithmetic = "float8 GEMM" if self.float8_compute else f"widened to {self.compute_dtype}"
        return f"{super().extra_repr()}, weight=float8_e4m3fn per-row scaled, {arithmetic}"


# ---------------------------------------------------------------------------------------------------------
# A layer's weight as stored (full width, or float8 + scales): what a merged LoRA reads, edits and restores


def stored_weight(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """The tensors that hold a linear layer's weight: (weight,) or, in float8, (values, scales)."""
    scale = getattr(layer, "weight_scale", None)
    return (layer.weight,) if scale is None else (layer.weight, scale)


def widened(stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`stored_weight`'s tensors (on any device) as one float32 matrix."""
    return stored[0].float() if len(stored) == 1 else dequantize(*stored, torch.float32)


def store_weight_(layer: nn.Module, weight: torch.Tensor) -> None:
    """Write a full-width `weight` into the layer in place (re-quantised, scales too, when it is float8):
    fused q/k/v views, compiled code and captured CUDA graphs see the new values."""
    stored = stored_weight(layer)
    if len(stored) == 1:
        stored[0].copy_(weight)
        return
    values, scale = quantize_rows(weight)
    stored[0].copy_(values)
    stored[1].copy_(scale)


# ---------------------------------------------------------------------------------------------------------
# Converting modules


def quantize_linears_(
    root: nn.Module,
    include: Callable[[str], bool] = lambda _name: True,
    float8_compute: Callable[[str], bool] = lambda _name: False,
) -> int:
    """Replace every `nn.Linear` under `root` whose name passes `include` by an `Fp8Linear` (computing in
    float8 where `float8_compute(name)`), one layer at a time on its own device (peak: one full-width
    matrix). Returns how many were replaced."""
    names = [
        name
        for name, m in root.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, Fp8Linear) and name and include(name)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, Fp8Linear(getattr(parent, child), float8_compute=float8_compute(name)))
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


def computes_in_float8(module: nn.Module) -> bool:
    """True when any layer under `module` runs float8 GEMMs."""
    return any(getattr(m, "float8_compute", False) for m in module.modules())


def dit_to_fp8_(dit: nn.Module, *, float8_compute: bool = False) -> int:
    """The DiT's transformer blocks' linear layers (self/cross-attention projections, FFN) to float8 storage;
    with `float8_compute` (a GPU where `float8_gemms` holds), `FLOAT8_COMPUTE_LAYERS` also compute in float8.

    Attention itself, norms, modulation, the patch / text / time embeddings and the head stay as they are."""
    return quantize_linears_(
        dit,
        lambda name: name.startswith("blocks."),
        lambda name: float8_compute and name.endswith(FLOAT8_COMPUTE_LAYERS),
    )


# ---------------------------------------------------------------------------------------------------------
# Can this device run float8 GEMMs?

_GEMMS: dict[tuple[str, frozenset[tuple[int, int]]], bool] = {}
Shapes = frozenset[tuple[int, int]]  # (in_features, out_features) of the layers that would compute in float8
PROBE_SHAPES: Shapes = frozenset({(256, 128)})


def compute_shapes(dit: nn.Module) -> Shapes:
    """The GEMM shapes `dit_to_fp8_(dit, float8_compute=True)` would run: each `FLOAT8_COMPUTE_LAYERS` layer's,
    and self-attention's fused q/k/v (`fuse_qkv`)."""
    shapes = set()
    for name, m in dit.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.endswith(FLOAT8_COMPUTE_LAYERS):
            shapes.add((m.in_features, m.out_features))
            if name.endswith("self_attn.q"):
                shapes.add((m.in_features, 3 * m.out_features))
    return frozenset(shapes)


def float8_gemms(device: torch.device | str, shapes: Shapes = PROBE_SHAPES) -> bool:
    """Whether float8 GEMMs run on `device`: a CUDA GPU of compute capability ≥ 8.9 on which a rowwise-scaled
    `_scaled_mm` of each of `shapes`, with an odd row count, runs and agrees with bf16 (probed once per
    device and shapes). False on the CPU (its float8 GEMM is not faster than bf16) and, with a warning naming
    the cause, on an older GPU or where the probe fails."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (str(torch.device("cuda", index)), frozenset(shapes))
    if key not in _GEMMS:
        _GEMMS[key] = _probe(torch.device(key[0]), key[1])
    return _GEMMS[key]


def _probe(device: torch.device, shapes: Shapes = PROBE_SHAPES) -> bool:
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_GEMM_CAPABILITY:  # said, not refused: float8 weights still halve the memory
        warnings.warn(
            f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no "
            "float8 tensor cores (8.9 or newer: RTX 40xx, L4, H100, ...): precision fp8 keeps the DiT's float8 "
            "weights (half their memory) with bf16 arithmetic, not faster than bf16",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    try:
        g = torch.Generator(device).manual_seed(0)
        for d_in, d_out in sorted(shapes):
            x = torch.randn(37, d_in, device=device, generator=g, dtype=torch.bfloat16)
            w = torch.randn(d_out, d_in, device=device, generator=g, dtype=torch.bfloat16)
            values, scale = quantize_rows(w)
            got = float8_matmul(x, values, scale).float()
            want = F.linear(x, dequantize(values, scale, torch.bfloat16)).float()
            error = float((got - want).norm() / want.norm())
            if not error < 0.1:  # float8 activations: measured ≈ 0.03 on random data
                raise RuntimeError(f"{d_in}→{d_out}: relative error {error:.3f} against bf16")
    except Exception as exc:  # an op this torch / driver lacks: storage only, never a failed stream
        warnings.warn(
            f"float8 GEMMs do not run on {torch.cuda.get_device_name(device)} ({type(exc).__name__}: {exc}); "
            "the DiT keeps float8 weights with bf16 arithmetic (memory, not speed)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
