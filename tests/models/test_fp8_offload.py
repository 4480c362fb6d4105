"""Weight-only fp8 storage (per-row scales) and the host-parked umT5: errors against bf16, and no re-copies."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from wanstream.engine.random_weights import demo_components
from wanstream.models.fp8 import (
    ABSOLUTE_ERROR_PER_AMAX,
    FP8,
    RELATIVE_ERROR,
    Fp8Linear,
    dequantize,
    quantize_embedding_,
    quantize_linears_,
    quantize_rows,
)
from wanstream.models.offload import HostTextEncoder
from wanstream.models.text import TextEncoder

PROMPTS = ["a cat in the city at night", "neon"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_every_element_is_within_the_stated_bound() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g)
    w[3] *= 1e-4  # a small row: its own scale keeps it accurate
    w[5] = 0.0  # an all-zero row
    w[7, :10] = 1e-9  # far below the row's range: subnormal in fp8
    values, scale = quantize_rows(w)
    assert values.dtype == FP8 and scale.shape == (64, 1)
    back = dequantize(values, scale, torch.float32)
    amax = w.abs().amax(1, keepdim=True)
    assert bool(((back - w).abs() <= RELATIVE_ERROR * w.abs() + ABSOLUTE_ERROR_PER_AMAX * amax + 1e-30).all())
    assert torch.equal(back[5], w[5])
    assert rel(back[3], w[3]) < 0.05  # relative accuracy does not depend on the row's size


def test_fp8_linear_output_error_and_memory() -> None:
    lin = nn.Linear(512, 256)
    x = torch.randn(100, 512, generator=torch.Generator().manual_seed(1))
    q = Fp8Linear(lin)
    assert q.weight.dtype == FP8 and q.weight.element_size() == 1
    assert type(q) is not nn.Linear and isinstance(q, nn.Linear)  # fused-GEMM fast paths skip it
    assert set(q.state_dict()) == {"weight", "bias"}  # official names, scales not in the state dict
    err = rel(q(x), lin(x))
    assert 0 < err < 0.04  # measured 0.025 (3 mantissa bits); RMS, not the worst case
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16


def _tiny_umt5() -> TextEncoder:
    """The demo's tiny random umT5, with T5's initialisation of q (1/sqrt(head_dim) folded in: T5 does
    not scale its logits), so attention is not saturated as it is with plain N(0, 1/fan_in) weights."""
    te = demo_components().text_encoder
    model = copy.deepcopy(te.model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q.weight.mul_(model.config.head_dim**-0.5)
    return TextEncoder(model, te.tokenizer)


def test_fp8_umt5_against_bf16_on_a_tiny_random_encoder() -> None:
    te = _tiny_umt5()
    f32 = te.encode(PROMPTS)
    bf16_model = copy.deepcopy(te.model).to(torch.bfloat16)
    bf16 = TextEncoder(bf16_model, te.tokenizer).encode(PROMPTS)
    fp8_model = copy.deepcopy(bf16_model)
    replaced = quantize_linears_(fp8_model)
    quantize_embedding_(fp8_model.token_embedding)
    assert replaced == 7 * len(fp8_model.blocks)
    fp8 = TextEncoder(fp8_model, te.tokenizer).encode(PROMPTS)
    assert fp8.dtype == torch.bfloat16 and torch.isfinite(fp8).all()
    # Measured: bf16 vs float32 0.015, fp8 vs bf16 0.081 (two random layers amplify each layer's 2.5%).
    assert rel(bf16, f32) < 0.03
    assert rel(fp8, bf16) < 0.12
    # Rows past each prompt's length stay exactly zero.
    length = int(te.tokenize(PROMPTS[1:]).lengths[0])
    assert not fp8[1, length:].any()


def test_host_encoder_gives_the_same_context_and_never_recopies_its_weights() -> None:
    te = _tiny_umt5()
    ref = te.encode(PROMPTS)
    model = copy.deepcopy(te.model)
    host = HostTextEncoder(model, te.tokenizer, "cpu")
    before = [(t.data_ptr(), t.dtype) for part in (*host.blocks, host.tail) for t in part.host]
    out = host.encode(PROMPTS)
    again = host.encode(PROMPTS[::-1])
    assert torch.equal(out, ref)
    assert torch.equal(again, ref.flip(0))
    params_now = [(p.data_ptr(), p.dtype) for p in model.blocks.parameters()] + [
        (model.norm.weight.data_ptr(), model.norm.weight.dtype)
    ]
    assert params_now == [b for b in before if b in params_now] and len(params_now) == len(before)
    assert host.device == torch.device("cpu") and host.host_bytes > 0


def test_host_encoder_refuses_a_model_already_on_a_device() -> None:
    te = _tiny_umt5()
    with pytest.raises(ValueError, match="host memory"):
        HostTextEncoder(te.model.to("meta"), te.tokenizer, "cpu")


def test_fp8_dit_against_bf16_on_a_tiny_random_dit() -> None:
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings
    from wanstream.models.fp8 import dit_to_fp8_

    from support.clips import moving_clip

    bf16 = demo_components(dtype=torch.bfloat16)
    fp8 = demo_components(dtype=torch.bfloat16)
    replaced = dit_to_fp8_(fp8.dit)
    blocks = fp8.dit.blocks
    assert replaced == 10 * len(blocks)  # self q/k/v/o, cross q/k/v/o, two FFN layers per block
    assert all(type(m) is Fp8Linear for b in blocks for m in b.modules() if isinstance(m, nn.Linear))
    # Embeddings and head stay full width.
    assert (
        fp8.dit.head.head.weight.dtype == torch.bfloat16
        and fp8.dit.patch_embedding.weight.dtype == torch.bfloat16
    )
    embeds = torch.randn(1, 7, bf16.dit.config.text_dim, generator=torch.Generator().manual_seed(3))
    clip = moving_clip(9)
    outs = []
    for c in (bf16, fp8):
        s = StreamSession(c, StreamSettings(height=32, width=48), output="float")
        s.set_prompt_embeddings(embeds.to(torch.bfloat16))
        outs.append(torch.cat([s.push(clip), s.flush()]).float())
    assert torch.isfinite(outs[1]).all()
    err = rel(outs[1], outs[0])
    print(f"fp8 DiT vs bf16, relative error of the output frames: {err:.4f}")
    assert 0 < err < 0.05, err  # measured 0.010 on this tiny random DiT (docs/memory.md)


def test_a_cached_prompt_does_not_bring_the_host_encoder_back() -> None:
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings

    c = demo_components()
    te = c.text_encoder
    host = HostTextEncoder(te.model, te.tokenizer, "cpu")
    calls = []
    forward = host._forward
    host._forward = lambda ids, mask: calls.append(ids.shape) or forward(ids, mask)  # type: ignore[method-assign]
    c.text_encoder = host
    session = StreamSession(c, StreamSettings(height=32, width=48))
    for prompt in ("a cat", "a dog", "a cat", "a dog"):
        session.set_prompts(prompt, switch="refresh")
    assert len(calls) == 2  # each new prompt once; switching back is the cache's


def test_host_encoder_runs_on_device_copies_under_inference_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a GPU: every call runs on fresh copies (here clones on the CPU), inside inference mode (the
    server's and generate's), and the module gets its host tensors back afterwards."""
    from wanstream.models.offload import HostParked

    te = _tiny_umt5()
    ref = te.encode(PROMPTS)
    model = copy.deepcopy(te.model)
    host = HostTextEncoder(model, te.tokenizer, "cpu")
    seen: list[int] = []
    monkeypatch.setattr(HostParked, "fetch", lambda self, device: [t.clone() for t in self.host])
    original = HostParked.attach

    def attach(self, copies):
        seen.extend(t.data_ptr() for t in copies)
        original(self, copies)

    monkeypatch.setattr(HostParked, "attach", attach)
    with torch.inference_mode():
        out = host.encode(PROMPTS)
    assert torch.equal(out, ref)
    host_ptrs = {t.data_ptr() for part in (*host.blocks, host.tail) for t in part.host}
    assert {p.data_ptr() for p in model.blocks.parameters()} <= host_ptrs  # back on the host tensors
    assert set(seen) - host_ptrs  # the calls ran on copies
    assert all(isinstance(p, torch.nn.Parameter) for p in model.blocks.parameters())


def test_host_tensors_are_views_of_one_exact_size_buffer() -> None:
    """One buffer, page-locked in place on a GPU machine (torch's pinned allocator would round each tensor
    up to a power of two); here the packing itself: every host tensor a view into it, aligned, no overlap."""
    te = _tiny_umt5()
    model = copy.deepcopy(te.model)
    host = HostTextEncoder(model, te.tokenizer, "cpu")
    flat = host._flat
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel()
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for part in (*host.blocks, host.tail)
        for t in part.host
    )
    assert all(start <= a and b <= end and a % 64 == 0 for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))
    assert host.host_bytes <= flat.numel() < host.host_bytes + 64 * len(spans)
    assert all(p.data_ptr() in {a for a, _ in spans} for p in model.blocks.parameters())


def test_quantizing_in_row_chunks_gives_the_same_result() -> None:
    w = torch.randn(1000, 64, generator=torch.Generator().manual_seed(5))
    whole, chunked = quantize_rows(w, chunk_rows=4096), quantize_rows(w, chunk_rows=96)
    assert torch.equal(whole[0].float(), chunked[0].float()) and torch.equal(whole[1], chunked[1])
