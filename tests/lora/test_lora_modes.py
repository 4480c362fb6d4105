"""Merged and runtime LoRAs on a tiny DiT: the same function, W + s·(α/r)·B·A, exact unmerge, fused q/k/v,
scale changes in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wanstream.engine.lora import LoraManager
from wanstream.engine.settings import LoraSpec
from wanstream.models.dit import WanDiT
from wanstream.models.lora import LoraLinear, linear_targets
from wanstream.weights.lora import LoraError, LoraFiles, LoraPair, LoraWeights

from support.lora_files import random_pairs, tiny_dit

ALL_BLOCK_LAYERS = [f"blocks.{b}.{m}" for b in (0, 1) for m in (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2",
)]  # fmt: skip


def weights_for(dit: WanDiT, layers: list[str], *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0):
    pairs = random_pairs(linear_targets(dit), layers, rank=rank, alpha=alpha, seed=seed)
    return LoraWeights(f"random-{seed}", {k: LoraPair(d, u, a) for k, (d, u, a) in pairs.items()})


def manager_with(dit: WanDiT, **loras: LoraWeights) -> LoraManager:
    manager = LoraManager(dit, source=LoraFiles())  # names it has not registered: files
    for name, weights in loras.items():
        manager.register(name, weights)
    return manager


def full_forward(dit: WanDiT, seed: int = 1) -> torch.Tensor:
    """The official bidirectional forward on a fixed random clip (every layer type takes part)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2, 4, 4, generator=gen)
    ctx = torch.randn(5, dit.config.text_dim, generator=gen)
    return dit.forward_full([x], torch.tensor([500.0]), [ctx])[0]


@pytest.mark.parametrize("mode", ["merged", "runtime"])
def test_one_layer_equals_the_hand_computed_update(dit: WanDiT, mode: str) -> None:
    weights = weights_for(dit, ["blocks.0.self_attn.q"], rank=4, alpha=2.0)
    pair = weights.pairs["blocks.0.self_attn.q"]
    layer = dit.blocks[0].self_attn.q
    W, b = layer.weight.clone(), layer.bias.clone()
    manager = manager_with(dit, style=weights)
    manager.apply([LoraSpec(path="style", scale=-1.7, mode=mode)])
    x = torch.randn(3, 7, 32)
    expected = F.linear(x, W + (-1.7) * (2.0 / 4) * pair.up @ pair.down, b)
    torch.testing.assert_close(dit.blocks[0].self_attn.q(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(dit.blocks[0].self_attn.q, LoraLinear) == (mode == "runtime")


def test_merged_and_runtime_models_compute_the_same_thing() -> None:
    a, b = tiny_dit(), tiny_dit()
    base = full_forward(a)
    loras = {
        "one": weights_for(a, ALL_BLOCK_LAYERS, seed=1),
        "two": weights_for(a, ALL_BLOCK_LAYERS[::3], seed=2),
    }
    specs = [LoraSpec(path="one", scale=0.8), LoraSpec(path="two", scale=-0.5)]
    manager_with(a, **loras).apply(specs, "merged")
    manager_with(b, **loras).apply(specs, "runtime")
    merged, runtime = full_forward(a), full_forward(b)
    assert (merged - base).abs().mean() > 1e-2  # the LoRAs do something
    torch.testing.assert_close(merged, runtime, rtol=1e-4, atol=1e-4)
    # One merged and one runtime LoRA: the same function again.
    c = tiny_dit()
    manager_with(c, **loras).apply(
        [LoraSpec(path="one", scale=0.8), LoraSpec(path="two", scale=-0.5, mode="runtime")]
    )
    torch.testing.assert_close(full_forward(c), merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_merge_then_unmerge_restores_the_weights_bit_for_bit(dtype: torch.dtype, fused: bool) -> None:
    dit = tiny_dit(dtype)
    if fused:
        dit.optimize(compile=False)  # q/k/v become views of one fused tensor
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    fused_before = dit.blocks[0].self_attn._fused[0].clone() if fused else None
    manager = manager_with(
        dit, one=weights_for(dit, ALL_BLOCK_LAYERS, seed=1), two=weights_for(dit, ALL_BLOCK_LAYERS, seed=2)
    )
    for scale in (1.0, -3.0, 0.25):  # several re-merges on the way
        manager.apply([LoraSpec(path="one", scale=scale), LoraSpec(path="two", scale=0.5)])
    assert not torch.equal(
        dit.state_dict()["blocks.0.self_attn.q.weight"], original["blocks.0.self_attn.q.weight"]
    )
    if fused:  # the in-place merge reached the fused GEMM's tensor
        assert torch.equal(dit.blocks[0].self_attn._fused[0][:32], dit.blocks[0].self_attn.q.weight)
    manager.clear()
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in original.items())
    if fused:
        assert torch.equal(dit.blocks[0].self_attn._fused[0], fused_before)


def test_re_merging_starts_from_the_original_so_errors_never_accumulate() -> None:
    dit = tiny_dit(torch.bfloat16)
    manager = manager_with(dit, one=weights_for(dit, ALL_BLOCK_LAYERS, seed=1))
    manager.apply([LoraSpec(path="one", scale=0.3)])
    direct = {k: v.clone() for k, v in dit.state_dict().items()}
    for scale in (0.9, -2.0, 7.5, 0.3):
        manager.apply([LoraSpec(path="one", scale=scale)])
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in direct.items())


def test_bf16_merge_is_within_half_an_ulp_of_the_exact_update() -> None:
    dit = tiny_dit(torch.bfloat16)
    weights = weights_for(dit, ["blocks.1.ffn.0"], rank=4, alpha=4.0)
    W = dit.blocks[1].ffn[0].weight.float().clone()
    manager_with(dit, one=weights).apply([LoraSpec(path="one", scale=1.3)])
    exact = W + 1.3 * weights.pairs["blocks.1.ffn.0"].delta()
    merged = dit.blocks[1].ffn[0].weight.float()
    assert ((merged - exact).abs() <= exact.abs() * 2**-8).all()  # bf16: unit roundoff 2^-8


def test_runtime_scale_changes_in_place_and_adapters_come_off_cleanly() -> None:
    dit = tiny_dit()
    dit.optimize(compile=False)
    originals = {name: dit.get_submodule(name) for name in ALL_BLOCK_LAYERS}
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    manager = manager_with(dit, one=weights_for(dit, ALL_BLOCK_LAYERS, seed=1))
    manager.apply([LoraSpec(path="one", scale=1.0, mode="runtime")])
    q = dit.blocks[0].self_attn.q
    assert isinstance(q, LoraLinear) and dit.blocks[0].self_attn._fused is None  # three GEMMs with adapters
    assert set(dit.state_dict()) == set(state)  # the state dict keeps its names (adapters are not in it)
    scales, structure, version = q.scales.data_ptr(), manager.structure, manager.version

    manager.apply([LoraSpec(path="one", scale=-2.5, mode="runtime")])
    assert dit.blocks[0].self_attn.q is q and q.scales.data_ptr() == scales  # the same tensor, new values
    assert torch.allclose(q.scales, torch.full((4,), -2.5 * 2.0 / 4))
    assert manager.structure == structure and manager.version == version + 1
    out = full_forward(dit)
    merged = tiny_dit()
    manager_with(merged, one=manager.load("one")).apply([LoraSpec(path="one", scale=-2.5)])
    torch.testing.assert_close(out, full_forward(merged), rtol=1e-4, atol=1e-4)

    manager.clear()
    assert manager.structure == structure + 1
    assert all(dit.get_submodule(name) is module for name, module in originals.items())
    assert dit.blocks[0].self_attn._fused is not None  # fused again
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in state.items())


def test_a_set_already_in_force_is_a_no_op_and_a_bad_one_changes_nothing(dit: WanDiT, tmp_path: Path) -> None:
    manager = manager_with(dit, one=weights_for(dit, ALL_BLOCK_LAYERS, seed=1))
    specs = [LoraSpec(path="one", scale=0.5)]
    assert manager.apply(specs) is True and manager.apply(specs) is False
    state, version = {k: v.clone() for k, v in dit.state_dict().items()}, manager.version
    with pytest.raises(LoraError, match="not found"):
        manager.apply([LoraSpec(path="one", scale=0.9), LoraSpec(path=str(tmp_path / "missing.safetensors"))])
    assert manager.in_force == (("one", 0.5, "merged"),) and manager.version == version
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(LoraError, match="layers this model does not have"):
        manager.register(
            "alien", LoraWeights("alien", {"blocks.9.ffn.0": manager.load("one").pairs["blocks.0.ffn.0"]})
        )


def test_without_a_source_only_registered_names_load(dit: WanDiT, tmp_path: Path) -> None:
    """The engine takes LoRA weights, not paths: a manager with no source (weights.lora.LoraFiles) opens no file."""
    manager = manager_with(dit, one=weights_for(dit, ["blocks.0.ffn.0"]))
    manager.source = None
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"never read")
    with pytest.raises(LoraError, match="no LoRA files"):
        manager.apply([LoraSpec(path=str(path))])
    assert manager.in_force == ()
    assert manager.apply([LoraSpec(path="one")]) is True
