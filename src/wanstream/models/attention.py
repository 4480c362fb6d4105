"""One attention function for every attention in wanstream.

Layout is [batch, heads, tokens, head_dim] throughout (the KV cache is stored that way so attention
reads it in place). torch SDPA is always available (on a Hopper GPU torch picks cuDNN's kernel). On a CUDA
GPU with bf16/fp16 inputs and no mask, an optional FlashAttention kernel is used when importable:
FlashAttention 3 (`flash_attn_interface`, Hopper), else FlashAttention 2 (`flash_attn`). The backend is
chosen once per process and logged once. `WANSTREAM_ATTENTION` overrides the choice: `sdpa` keeps SDPA;
`fa4` asks for FlashAttention 4 (`flash_attn.cute`, the `flash-attn-4` package: CuTe DSL kernels compiled at
their first call) — opt-in until it is measured against cuDNN at the stream's shapes (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_flash: _Backend | None = None
_flash_name = "sdpa"
_probed = False


def _tokens_major(flash_attn_func: Callable[..., object]) -> _Backend:
    """A FlashAttention function (q/k/v [B, S, H, D]; some versions return (out, lse)) as a backend on
    [B, H, S, D] tensors: the transposes are views, nothing is copied."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)  # type: ignore[union-attr]

    return run


def _fa4() -> tuple[_Backend, str] | None:
    try:
        from flash_attn.cute.interface import flash_attn_func
    except Exception as exc:  # not installed, or its CUDA stack does not load here
        warnings.warn(
            f"WANSTREAM_ATTENTION=fa4, but FlashAttention 4 does not load ({type(exc).__name__}: {exc}); "
            "using torch SDPA. Install it with `pip install flash-attn-4`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _tokens_major(flash_attn_func), "flash-attention 4"


def _installed_flash() -> tuple[_Backend, str] | None:
    try:
        import flash_attn_interface  # FA3 (Hopper)

        return _tokens_major(flash_attn_interface.flash_attn_func), "flash-attention 3"
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FA2

        return _tokens_major(flash_attn_func), "flash-attention 2"
    except ImportError:
        return None


def _probe_flash() -> None:
    """Choose the backend once (`WANSTREAM_ATTENTION`: `sdpa`, `fa4`; unset: an installed FA3 / FA2)."""
    global _flash, _flash_name, _probed
    _probed = True
    wanted = os.environ.get("WANSTREAM_ATTENTION", "").lower()
    found = None
    if wanted != "sdpa" and torch.cuda.is_available():
        found = _fa4() if wanted == "fa4" else _installed_flash()
    _flash, _flash_name = found if found is not None else (None, "sdpa")
    log.info("attention backend: %s", _flash_name if found is not None else "torch SDPA")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim); q [B,H,Sq,D], k/v [B,H,Sk,D] → [B,H,Sq,D].

    `mask` (bool, True = attend) broadcasts to [B, H, Sq, Sk].
    """
    if not _probed:
        _probe_flash()
    if (
        _flash is not None
        and mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and not torch.compiler.is_compiling()
    ):
        return _flash(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
