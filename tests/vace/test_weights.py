"""load_vace: the VACE-only file, full checkpoints, strict keys and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wanstream.engine.random_weights import randomize_
from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.vace import VaceModule
from wanstream.weights.loaders import CheckpointError
from wanstream.weights.vace import load_vace

TINY = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=4, text_len=16, text_dim=32, freq_dim=32)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    vace = randomize_(VaceModule(TINY), seed=5)
    return {k: v.clone().contiguous() for k, v in vace.state_dict().items()}


def test_loads_the_vace_only_file_exactly(tmp_path: Path, state) -> None:
    path = tmp_path / "Wan2_1-VACE_module_tiny.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    vace = load_vace(path, WanDiT(TINY), dtype=torch.float32)
    assert vace.vace_layers == (0, 2)
    loaded = vace.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v.to(torch.bfloat16).float()), k
    assert not any(p.requires_grad for p in vace.parameters())


def test_a_full_checkpoint_is_filtered_to_its_vace_tensors(state) -> None:
    dit_sd = WanDiT(TINY).state_dict()
    full = {f"model.diffusion_model.{k}": v for k, v in {**dit_sd, **state}.items()}
    vace = load_vace(full, TINY, dtype=torch.float32, source="wan2.1_vace_tiny.safetensors")
    assert torch.equal(
        vace.state_dict()["vace_blocks.1.after_proj.weight"], state["vace_blocks.1.after_proj.weight"]
    )


def test_missing_tensor_is_named_with_the_file(state) -> None:
    broken = {k: v for k, v in state.items() if k != "vace_blocks.1.ffn.2.bias"}
    with pytest.raises(CheckpointError, match=r"vace\.sft.*missing keys: vace_blocks\.1\.ffn\.2\.bias"):
        load_vace(broken, TINY, source="vace.sft")


def test_width_and_block_count_mismatches_are_explained(state) -> None:
    wide = WanConfig(dim=128, ffn_dim=128, num_heads=2, num_layers=4, text_len=16, text_dim=32, freq_dim=32)
    with pytest.raises(CheckpointError, match="width 64, this DiT has width 128"):
        load_vace(state, wide, source="vace.sft")
    with pytest.raises(CheckpointError, match="2 VACE blocks but 3 hint layers"):
        load_vace(state, TINY, vace_layers=[0, 1, 2], source="vace.sft")
    channels = dict(state, **{"vace_patch_embedding.weight": torch.zeros(64, 48, 1, 2, 2)})
    with pytest.raises(CheckpointError, match="48 context channels"):
        load_vace(channels, TINY, source="vace.sft")


def test_a_file_without_vace_tensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in WanDiT(TINY).state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="holds no VACE weights"):
        load_vace(path, TINY)
    with pytest.raises(FileNotFoundError):
        load_vace(tmp_path / "nope.safetensors", TINY)
