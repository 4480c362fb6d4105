"""Pipeline.load: official file layouts on disk → a working stream; missing files → the download command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wanstream import Pipeline
from wanstream.weights.store import MissingWeightsError

from support.clips import moving_clip
from support.models_dir import write_tiny_models_dir


@pytest.mark.parametrize("text_encoder", ["bf16", "fp8"])
def test_load_from_a_models_folder_and_stream(tmp_path: Path, text_encoder: str) -> None:
    root = write_tiny_models_dir(tmp_path / "models", text_encoder=text_encoder)
    messages: list[str] = []
    pipe = Pipeline.load(root, device="cpu", dtype=torch.float32, progress=messages.append)
    assert not pipe.is_demo and pipe.components.taehv is not None
    assert any("diffusion model" in m for m in messages) and any("text encoder" in m for m in messages)
    session = pipe.session(height=32, width=48, prompts=["a watercolor fox in the snow"])
    clip = moving_clip(9)
    out = torch.cat([session.push(clip), session.flush()])
    assert out.shape == (9, 32, 48, 3)
    # The files hold the demo's networks: with the same text conditioning, the same frames come out.
    demo = Pipeline.demo()
    embeds = torch.randn(1, 7, demo.components.dit.config.text_dim)
    outs = []
    for p in (pipe, demo):
        s = p.session(height=32, width=48)
        s.set_prompt_embeddings(embeds)
        outs.append(torch.cat([s.push(clip), s.flush()]))
    assert torch.equal(outs[0], outs[1])


def test_missing_weights_name_the_download_command(tmp_path: Path) -> None:
    root = write_tiny_models_dir(tmp_path / "models")
    (root / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(MissingWeightsError) as err:
        Pipeline.load(root, device="cpu")
    assert "wanstream download" in str(err.value) and "Wan2.1_VAE.pth" in str(err.value)


def test_memory_choices_fp8_text_encoder_fp8_dit_and_the_low_vram_profile(tmp_path: Path) -> None:
    from wanstream.models.fp8 import FP8, Fp8Linear, computes_in_float8
    from wanstream.pipeline import LOW_VRAM_SETTINGS

    root = write_tiny_models_dir(tmp_path / "models")
    pipe = Pipeline.load(root, device="cpu", dtype=torch.float32, text_encoder="fp8", precision="fp8")
    c = pipe.components
    assert (c.text_placement, c.precision) == ("fp8", "fp8")
    assert c.text_encoder.model.token_embedding.weight.dtype == FP8
    assert isinstance(c.dit.blocks[0].ffn[0], Fp8Linear) and c.dit.head.head.weight.dtype == torch.float32
    assert not computes_in_float8(c.dit)  # the CPU: float8 storage, widened per call (no float8 GEMMs)
    session = pipe.session(height=32, width=48, prompts=["a watercolor fox in the snow"])
    out = torch.cat([session.push(moving_clip(9)), session.flush()])
    assert out.shape == (9, 32, 48, 3)
    # The profile: host text encoder (the CPU is the host: nothing to park) and the fp8 DiT.
    low = Pipeline.load(root, device="cpu", dtype=torch.float32, low_vram=True)
    assert (low.components.text_placement, low.components.precision) == ("gpu", "fp8")
    session = low.session(height=32, width=48, prompts=["a fox"], **LOW_VRAM_SETTINGS)
    assert session.settings.encoder == "taehv" and session.push(moving_clip(9)).shape[1:] == (32, 48, 3)
    with pytest.raises(ValueError, match="placement"):
        Pipeline.load(root, device="cpu", text_encoder="disk")
    with pytest.raises(ValueError, match="precision"):
        Pipeline.load(root, device="cpu", precision="int4")
