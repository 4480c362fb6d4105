"""Which attention kernel `models.attention` uses (`WANSTREAM_ATTENTION`, installed FlashAttention), and that a
FlashAttention backend sees [B, S, H, D] views and gives back SDPA's result in [B, H, S, D]. The kernels are
stand-ins (plain SDPA in FlashAttention's layout): the GPU ones cannot run here; the choice and the layouts can."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from wanstream.models import attention as attn

HEADS = 3


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test chooses anew as on a CUDA machine; the process's choice is restored afterwards."""
    saved = (attn._flash, attn._flash_name, attn._probed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WANSTREAM_ATTENTION", raising=False)
    for name in ("flash_attn_interface", "flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):
        monkeypatch.setitem(sys.modules, name, None)  # none installed unless a test installs a stand-in
    yield
    attn._flash, attn._flash_name, attn._probed = saved


def _flash_layout_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in FlashAttention function: [B, S, H, D] in and out, and (out, lse) as FA3 / FA4 return."""
    assert q.shape[2] == k.shape[2] == HEADS, "FlashAttention's layout: tokens before heads"
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2), torch.zeros(())


def _install(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        module = types.ModuleType(name)
        module.flash_attn_func = _flash_layout_sdpa  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, module)


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, HEADS, 5, 8, generator=gen)  # [B, H, Sq, D]
    k, v = (torch.randn(2, HEADS, 7, 8, generator=gen) for _ in range(2))
    return q, k, v


def test_fa4_is_used_when_asked_for_and_gives_sdpas_result(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "flash_attn", "flash_attn.cute", "flash_attn.cute.interface")
    monkeypatch.setenv("WANSTREAM_ATTENTION", "fa4")
    attn._probe_flash()
    assert attn._flash_name == "flash-attention 4" and attn._flash is not None
    q, k, v = _qkv()
    torch.testing.assert_close(attn._flash(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_fa4_asked_for_but_missing_warns_and_keeps_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANSTREAM_ATTENTION", "fa4")
    with pytest.warns(RuntimeWarning, match="pip install flash-attn-4"):
        attn._probe_flash()
    assert attn._flash is None and attn._flash_name == "sdpa"


def test_an_installed_fa3_is_chosen_unless_sdpa_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "flash_attn_interface")
    attn._probe_flash()
    assert attn._flash_name == "flash-attention 3"
    monkeypatch.setenv("WANSTREAM_ATTENTION", "sdpa")
    attn._probe_flash()
    assert attn._flash is None and attn._flash_name == "sdpa"


def test_without_flash_attention_or_cuda_sdpa_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    attn._probe_flash()
    assert attn._flash is None
    _install(monkeypatch, "flash_attn_interface")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    attn._probe_flash()
    assert attn._flash is None
    q, k, v = _qkv()
    torch.testing.assert_close(attn.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
