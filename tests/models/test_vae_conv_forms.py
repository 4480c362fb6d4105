"""The conv2d forms of the Wan VAE's 3x3x3 causal conv that tools/gpu/vae_profile.py times on the GPU compute
the same convolution (else their timings would compare different work)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu" / "vae_profile.py"


def _tool():
    spec = importlib.util.spec_from_file_location("vae_profile", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])  # the VAE's is the 2nd
@pytest.mark.parametrize("form", ["conv3d_as_conv2d_taps", "conv3d_as_stacked_conv2d"])
def test_conv2d_forms_equal_the_causal_conv3d(form: str, layout: torch.memory_format) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 9, generator=g, dtype=torch.float64)  # T+2 = 6 frames in: 4 out
    x = x.contiguous(memory_format=layout)
    w = torch.randn(3, 5, 3, 3, 3, generator=g, dtype=torch.float64)
    want = F.conv3d(x, w, None, 1, (0, 1, 1))
    got = getattr(_tool(), form)(x, w)
    assert got.shape == want.shape == (2, 3, 4, 7, 9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
