"""One attention function for every attention in wanstream.

Layout is [batch, heads, tokens, head_dim] throughout (the KV cache is stored that way so attention
reads it in place). torch SDPA is always available; on a CUDA GPU with bf16/fp16 inputs and no mask,
FlashAttention-3 (`flash_attn_interface`) or FlashAttention-2 (`flash_attn`) is used when importable.
The backend is chosen once per process and logged once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_flash: _Backend | None = None
_flash_name = "sdpa"
_probed = False


def _probe_flash() -> None:
    """Find an optional flash-attention kernel once; `WANSTREAM_ATTENTION=sdpa` forces SDPA."""
    global _flash, _flash_name, _probed
    _probed = True
    if os.environ.get("WANSTREAM_ATTENTION", "").lower() == "sdpa" or not torch.cuda.is_available():
        log.info("attention backend: torch SDPA")
        return
    try:
        import flash_attn_interface  # FA3 (Hopper)

        def fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = flash_attn_interface.flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)

        _flash, _flash_name = fa3, "flash-attention 3"
    except ImportError:
        try:
            from flash_attn import flash_attn_func  # FA2

            def fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
                    1, 2
                )

            _flash, _flash_name = fa2, "flash-attention 2"
        except ImportError:
            pass
    log.info("attention backend: %s", _flash_name)


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
