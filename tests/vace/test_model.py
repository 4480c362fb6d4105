"""The VACE module: official layout at full size, hints, injection, and Scope's quirks."""

from __future__ import annotations

import pytest
import torch

from wanstream.engine.random_weights import randomize_
from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.kv_cache import KVCache, KVCacheConfig
from wanstream.models.vace import VaceExtension, VaceModule, default_vace_layers, vace_sinusoid

TINY = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=4, text_len=16, text_dim=32, freq_dim=32)

BLOCK_KEYS = [
    "modulation",
    *(f"self_attn.{p}.{t}" for p in "qkvo" for t in ("weight", "bias")),
    "self_attn.norm_q.weight",
    "self_attn.norm_k.weight",
    "norm3.weight",
    "norm3.bias",
    *(f"cross_attn.{p}.{t}" for p in "qkvo" for t in ("weight", "bias")),
    "cross_attn.norm_q.weight",
    "cross_attn.norm_k.weight",
    "ffn.0.weight",
    "ffn.0.bias",
    "ffn.2.weight",
    "ffn.2.bias",
    "after_proj.weight",
    "after_proj.bias",
]


def test_full_size_module_on_meta_has_the_official_keys_and_parameter_count() -> None:
    with torch.device("meta"):
        vace = VaceModule(WanConfig.t2v_1_3b())
    sd = vace.state_dict()
    expected = {f"vace_blocks.{n}.{k}" for n in range(15) for k in BLOCK_KEYS}
    expected |= {"vace_blocks.0.before_proj.weight", "vace_blocks.0.before_proj.bias"}
    expected |= {"vace_patch_embedding.weight", "vace_patch_embedding.bias"}
    assert set(sd) == expected
    assert len(sd) == 439
    assert sum(p.numel() for p in vace.parameters()) == 734_975_232
    assert tuple(sd["vace_patch_embedding.weight"].shape) == (1536, 96, 1, 2, 2)
    assert tuple(sd["vace_blocks.3.ffn.0.weight"].shape) == (8960, 1536)
    assert tuple(sd["vace_blocks.0.modulation"].shape) == (1, 6, 1536)
    block0 = sum(v.numel() for k, v in sd.items() if k.startswith("vace_blocks.0."))
    block1 = sum(v.numel() for k, v in sd.items() if k.startswith("vace_blocks.1."))
    assert (block0, block1) == (51_162_368, 48_801_536)
    assert vace.vace_layers == tuple(range(0, 30, 2))
    assert vace.hint_of_layer == {layer: n for n, layer in enumerate(range(0, 30, 2))}


def test_vace_layers_are_checked() -> None:
    assert default_vace_layers(4) == (0, 2)
    for bad in ([], [1, 3], [0, 2, 2], [2, 0], [0, 4]):
        with pytest.raises(ValueError, match="vace_layers"):
            VaceModule(TINY, bad)


def test_float32_sinusoid_is_scopes_formula_and_close_to_the_float64_one() -> None:
    t = torch.tensor([0.0, 250.0, 750.0, 1000.0])
    half = 16
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    arg = t[:, None] * freqs[None]
    ref = torch.cat([arg.cos(), arg.sin()], 1)
    ours = vace_sinusoid(32, t)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-4)
    from wanstream.models.dit import sinusoid

    assert (ours.double() - sinusoid(32, t)).abs().max() < 1e-3


@pytest.fixture(scope="module")
def models() -> tuple[WanDiT, VaceModule]:
    dit = randomize_(WanDiT(TINY), seed=1).eval()
    vace = randomize_(VaceModule(TINY), seed=2).eval()
    return dit, vace


def _call(dit, vace, ext, frames: int = 2, h: int = 8, w: int = 12) -> torch.Tensor:
    """One streaming DiT call on a fresh cache (chunk at position 0) with the given extension."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, 16, h, w, generator=gen)
    t = torch.full((1, frames), 750)
    text = torch.randn(1, 7, TINY.text_dim, generator=gen)
    L = (h // 2) * (w // 2)
    cache = KVCache(
        KVCacheConfig(TINY.num_layers, TINY.num_heads, TINY.head_dim, L, 6, 3, -1.0, eviction="fifo")
    )
    plan = cache.plan([0], frames)
    with torch.inference_mode():
        return dit.forward_stream(x, t, dit.cross_kv(text), cache, plan, ext)


def _context(frames: int, h: int = 8, w: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randn(96, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _text(dit, vace):
    text = torch.randn(1, 7, TINY.text_dim, generator=torch.Generator().manual_seed(0))
    return vace.text_kv(dit, text)


def test_hints_steer_the_output_and_scale_zero_is_exactly_the_sinusoid_only_forward(models) -> None:
    dit, vace = models
    text = _text(dit, vace)
    plain = _call(dit, vace, None)
    sinusoid_only = _call(dit, vace, VaceExtension(vace, None, None))
    zero = _call(dit, vace, VaceExtension(vace, _context(2), text, 0.0))
    one = _call(dit, vace, VaceExtension(vace, _context(2), text, 1.0))
    two = _call(dit, vace, VaceExtension(vace, _context(2), text, 2.0))
    assert torch.equal(zero, sinusoid_only)  # scale 0 adds exactly nothing (hints still computed)
    # The float32 sinusoid alone moves the output a little (Scope's quirk); the hints move it a lot.
    quirk = (sinusoid_only - plain).norm() / plain.norm()
    assert 0 < quirk < 1e-4
    assert (one - zero).norm() / zero.norm() > 1e-2
    assert not torch.allclose(one, two)
    # With the float64 sinusoid, scale 0 is the plain DiT, bit for bit.
    assert torch.equal(
        _call(dit, vace, VaceExtension(vace, _context(2), text, 0.0, float32_sinusoid=False)), plain
    )


def test_hints_are_added_after_the_vace_layers_only(models) -> None:
    dit, vace = models
    ext = VaceExtension(vace, _context(2), _text(dit, vace), 1.5)
    _call(dit, vace, ext)
    assert ext.hints is not None and len(ext.hints) == 2
    h = torch.randn(1, 48, TINY.dim)
    assert torch.equal(ext.after_block(1, h), h) and torch.equal(ext.after_block(3, h), h)
    assert torch.equal(ext.after_block(0, h), h + ext.hints[0] * 1.5)
    assert torch.equal(ext.after_block(2, h), h + ext.hints[1] * 1.5)


def test_context_longer_than_the_chunk_is_truncated_and_shorter_zero_filled(models) -> None:
    dit, vace = models
    text = _text(dit, vace)
    long = _context(3)
    cut = _call(dit, vace, VaceExtension(vace, long, text))
    assert torch.equal(cut, _call(dit, vace, VaceExtension(vace, long[:, :2].contiguous(), text)))
    tokens = vace.embed_context(_context(1), 48)
    assert tokens.shape == (1, 48, TINY.dim)
    assert torch.count_nonzero(tokens[:, 24:]) == 0  # the chunk's second frame gets zero tokens
    assert torch.count_nonzero(tokens[:, :24]) > 0


def test_zero_padded_keys_dilute_attention_unless_the_chunk_fills_whole_blocks(models) -> None:
    dit, vace = models
    text = _text(dit, vace)
    # 2 frames of 6x4 tokens = 48 tokens: Scope pads to 128 with unmasked zero keys.
    scope = _call(dit, vace, VaceExtension(vace, _context(2), text))
    fixed = _call(dit, vace, VaceExtension(vace, _context(2), text, pad_keys=False))
    assert (scope - fixed).norm() / fixed.norm() > 1e-3
    # 2 frames of 8x8 tokens = 128 tokens: nothing is padded, both agree exactly.
    ctx = _context(2, 16, 16)
    a = _call(dit, vace, VaceExtension(vace, ctx, text), h=16, w=16)
    b = _call(dit, vace, VaceExtension(vace, ctx, text, pad_keys=False), h=16, w=16)
    assert torch.equal(a, b)


def test_the_clean_pass_has_no_hints_but_keeps_the_sinusoid_choice(models) -> None:
    dit, vace = models
    ext = VaceExtension(vace, _context(2), _text(dit, vace), 1.0, float32_sinusoid=True)
    clean = ext.clean_pass()
    assert isinstance(clean, VaceExtension) and clean.context is None
    t = torch.tensor([0.0])
    assert torch.equal(clean.time_sinusoid(32, t), vace_sinusoid(32, t))
    assert VaceExtension(vace, None, None, float32_sinusoid=False).clean_pass().float32_sinusoid is False


def test_bad_contexts_are_rejected(models) -> None:
    dit, vace = models
    with pytest.raises(ValueError, match="96"):
        VaceExtension(vace, torch.zeros(32, 1, 8, 12), _text(dit, vace))
    with pytest.raises(ValueError, match="text"):
        VaceExtension(vace, _context(1), None)
    with pytest.raises(ValueError, match="latents are 4x4"):
        _call(dit, vace, VaceExtension(vace, _context(2, 4, 4), _text(dit, vace)))
