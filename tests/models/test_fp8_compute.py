"""Float8 GEMMs (`precision="fp8"` on a GPU with float8 tensor cores): the arithmetic, which layers use it,
the fused q/k/v, the device probe, and LoRAs (merged: re-quantised; runtime: bf16 adapters) on float8 layers.

The GEMM itself is torch's rowwise-scaled `_scaled_mm`; the CPU build runs the same arithmetic (float8
inputs, float32 accumulation), so these tests force `float8_compute` on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wanstream.engine.lora import LoraManager
from wanstream.engine.random_weights import demo_components
from wanstream.engine.settings import LoraSpec
from wanstream.models import fp8
from wanstream.models.fp8 import FLOAT8_COMPUTE_LAYERS, Fp8Linear, dit_to_fp8_, quantize_rows
from wanstream.models.lora import LoraLinear, linear_targets
from wanstream.weights.lora import LoraPair, LoraWeights

from support.lora_files import random_pairs, tiny_dit


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def scaled_mm_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Every `_scaled_mm` call's first operand shape (proof the float8 GEMM ran)."""
    calls: list[tuple[int, ...]] = []
    real = torch._scaled_mm

    def counted(a: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


def test_float8_matmul_error_against_the_bf16_product_of_the_same_weights() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 256, generator=g).to(torch.bfloat16)  # an odd row count (37 tokens a lane)
    x[0, 3] *= 1e-3  # a quiet token keeps its own scale
    values, scale = quantize_rows(torch.randn(96, 256, generator=g))
    got = fp8.float8_matmul(x, values, scale)
    want = F.linear(x.float(), fp8.dequantize(values, scale, torch.float32))
    assert got.shape == (2, 37, 96) and got.dtype == torch.bfloat16
    err = rel(got, want)
    print(f"float8 GEMM vs the float32 product of the same float8 weights: {err:.4f}")
    assert 0 < err < 0.05  # measured 0.026: the activations' 3 mantissa bits (RMS, not the worst case)
    assert rel(got[0, 3], want[0, 3]) < 0.05  # per-token scales: a quiet token is as accurate


def test_fp8_linear_computes_in_float8_only_when_asked_and_only_for_bf16(scaled_mm_calls: list) -> None:
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    widened, computed = Fp8Linear(lin), Fp8Linear(lin, float8_compute=True)
    assert computed.compute_dtype == torch.bfloat16 and "float8 GEMM" in repr(computed)
    a = widened(x)
    assert scaled_mm_calls == []
    b = computed(x)
    assert scaled_mm_calls == [(5, 64)]
    assert 0 < rel(b, a) < 0.06  # only the activations' rounding differs (2.6 %: the test above)
    computed(x.float())  # float32 activations (the float32 conformance path): widened, no float8 GEMM
    assert len(scaled_mm_calls) == 1
    assert set(computed.state_dict()) == {"weight", "bias"}  # official names, scales not in the state dict


def test_dit_to_fp8_computes_in_float8_only_in_the_layers_measured_faster() -> None:
    dit = tiny_dit(torch.bfloat16)
    assert dit_to_fp8_(dit, float8_compute=True) == 10 * len(dit.blocks)
    computing = {n for n, m in dit.named_modules() if getattr(m, "float8_compute", False)}
    assert computing == {
        f"blocks.{b}.{layer}" for b in range(len(dit.blocks)) for layer in FLOAT8_COMPUTE_LAYERS
    }
    assert fp8.computes_in_float8(dit)
    storage_only = tiny_dit(torch.bfloat16)
    dit_to_fp8_(storage_only)
    assert any(isinstance(m, Fp8Linear) for m in storage_only.modules())
    assert not fp8.computes_in_float8(storage_only)


def test_fused_qkv_in_float8_equals_three_float8_layers(scaled_mm_calls: list) -> None:
    dit = tiny_dit(torch.bfloat16)
    dit_to_fp8_(dit, float8_compute=True)
    attn = dit.blocks[0].self_attn
    x = torch.randn(2, 11, dit.config.dim).to(torch.bfloat16)
    separate = [t.clone() for t in attn.qkv(x)]
    assert attn.fuse_qkv() and attn._fused is not None and attn._fused.float8_compute
    # The per-layer tensors are views of the fused ones: an in-place edit (a merged LoRA) reaches both.
    assert attn.q.weight.data_ptr() == attn._fused.weight.data_ptr()
    assert attn.v.weight_scale.data_ptr() == attn._fused.scale[2 * dit.config.dim :].data_ptr()
    calls_before = len(scaled_mm_calls)
    fused = attn.qkv(x)
    assert len(scaled_mm_calls) == calls_before + 1  # one GEMM for q, k and v
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)  # the same math; summation order may differ
    assert set(dit.state_dict()) == set(tiny_dit().state_dict())  # fusing renames nothing


def test_a_stream_with_float8_gemms_against_bf16_on_a_tiny_random_dit(scaled_mm_calls: list) -> None:
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings

    from support.clips import moving_clip

    bf16, storage, computed = (demo_components(dtype=torch.bfloat16) for _ in range(3))
    dit_to_fp8_(storage.dit)
    dit_to_fp8_(computed.dit, float8_compute=True)
    computed.dit.optimize(compile=False)  # fuse q/k/v, as the GPU path does
    embeds = torch.randn(1, 7, bf16.dit.config.text_dim, generator=torch.Generator().manual_seed(3))
    clip = moving_clip(9)
    outs = []
    for c in (bf16, storage, computed):
        s = StreamSession(c, StreamSettings(height=32, width=48), output="float")
        s.set_prompt_embeddings(embeds.to(torch.bfloat16))
        outs.append(torch.cat([s.push(clip), s.flush()]).float())
    assert scaled_mm_calls  # the float8 GEMMs ran (and only in the third stream: the others widen)
    assert torch.isfinite(outs[2]).all()
    storage_err, compute_err = rel(outs[1], outs[0]), rel(outs[2], outs[0])
    print(f"vs bf16: float8 weights {storage_err:.4f}, float8 GEMMs {compute_err:.4f}")
    assert not torch.equal(outs[2], outs[1])
    assert 0 < compute_err < 0.05, compute_err  # measured 0.011 (float8 weights alone 0.010): docs/memory.md


def test_the_probe_decides_from_the_capability_and_a_real_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """`float8_gemms` is False on the CPU; on CUDA the probe needs compute capability >= 8.9 and a float8
    GEMM that runs and agrees with bf16 (run here on the CPU's `_scaled_mm` through a faked capability)."""
    assert fp8.float8_gemms("cpu") is False
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.warns(RuntimeWarning, match=r"compute capability 8\.6\) has no float8 tensor cores"):
        assert fp8._probe(cpu) is False  # Ampere: said, and nothing launched
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8._probe(cpu) is True
    shapes = fp8.compute_shapes(tiny_dit())  # the layers' own shapes, the fused q/k/v's too
    dim, ffn = tiny_dit().config.dim, tiny_dit().config.ffn_dim
    assert shapes == {(dim, dim), (dim, 3 * dim), (dim, ffn), (ffn, dim)}
    probed = []
    real_matmul = fp8.float8_matmul
    monkeypatch.setattr(
        fp8, "float8_matmul", lambda x, v, s: probed.append(tuple(v.shape)) or real_matmul(x, v, s)
    )
    assert fp8._probe(cpu, shapes) is True
    assert sorted(probed) == sorted((d_out, d_in) for d_in, d_out in shapes)
    monkeypatch.setattr(fp8, "float8_matmul", real_matmul)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("Rowwise scaling is not currently supported on your device")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    with pytest.warns(RuntimeWarning, match="float8 GEMMs do not run on a test GPU .*bf16 arithmetic"):
        assert fp8._probe(cpu) is False


# ---------------------------------------------------------------------------------------------------------
# LoRAs on float8 layers


def _weights(dit: nn.Module, layers: list[str], seed: int = 0) -> LoraWeights:
    pairs = random_pairs(linear_targets(dit), layers, rank=4, alpha=2.0, seed=seed)
    return LoraWeights(f"random-{seed}", {k: LoraPair(d, u, a) for k, (d, u, a) in pairs.items()})


LAYERS = ["blocks.0.self_attn.q", "blocks.0.self_attn.v", "blocks.1.ffn.2", "blocks.1.cross_attn.o"]


def test_a_merged_lora_re_quantises_and_unmerges_bit_for_bit() -> None:
    dit = tiny_dit(torch.bfloat16)
    dit_to_fp8_(dit, float8_compute=True)
    dit.optimize(compile=False)  # q/k/v fused: the merge must reach the fused tensors
    before = {n: (m.weight.clone(), m.weight_scale.clone()) for n, m in dit.named_modules() if n in LAYERS}
    lora = _weights(dit, LAYERS)
    manager = LoraManager(dit)
    manager.register("style", lora)
    for scale in (0.5, -1.3):  # a re-merge starts from the original: no accumulated rounding
        manager.apply([LoraSpec(path="style", scale=scale, mode="merged")])
        for name in LAYERS:
            layer = dit.get_submodule(name)
            pair = lora.pairs[name]
            # W' = re-quantised(widened W₀ + s·(α/r)·B·A), from the float8 original every time
            want = fp8.widened(before[name]).addmm_(
                pair.up.float(), pair.down.float(), alpha=scale * pair.factor
            )
            values, scales = quantize_rows(want)
            assert torch.equal(layer.weight.view(torch.uint8), values.view(torch.uint8)), name
            assert torch.equal(layer.weight_scale, scales), name
    fused = dit.blocks[0].self_attn._fused
    assert fused is not None and fused.weight.data_ptr() == dit.blocks[0].self_attn.q.weight.data_ptr()
    manager.clear()
    for name in LAYERS:
        layer = dit.get_submodule(name)
        assert torch.equal(layer.weight.view(torch.uint8), before[name][0].view(torch.uint8))
        assert torch.equal(layer.weight_scale, before[name][1])


def test_a_runtime_lora_on_a_float8_layer_adds_bf16_adapters(scaled_mm_calls: list) -> None:
    dit = tiny_dit(torch.bfloat16)
    dit_to_fp8_(dit, float8_compute=True)
    name = "blocks.0.ffn.0"
    base = dit.get_submodule(name)
    x = torch.randn(3, 9, dit.config.dim).to(torch.bfloat16)
    plain = base(x)
    lora = _weights(dit, [name])
    manager = LoraManager(dit)
    manager.register("style", lora)
    manager.apply([LoraSpec(path="style", scale=0.7, mode="runtime")])
    adapted = dit.get_submodule(name)
    assert isinstance(adapted, LoraLinear) and adapted.float8_compute and adapted.weight is base.weight
    assert adapted.down.dtype == torch.bfloat16 and adapted.up.dtype == torch.bfloat16
    pair = lora.pairs[name]
    low_rank = 0.7 * pair.factor * F.linear(F.linear(x.float(), pair.down.float()), pair.up.float())
    calls = len(scaled_mm_calls)
    torch.testing.assert_close(adapted(x).float(), plain.float() + low_rank, rtol=0.03, atol=0.03)
    assert len(scaled_mm_calls) == calls + 1  # the base layer still ran its float8 GEMM
    manager.clear()
    assert dit.get_submodule(name) is base
