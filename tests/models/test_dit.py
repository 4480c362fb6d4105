"""The Wan DiT: official key layout at full size, and streaming == full forward where they must agree."""

from __future__ import annotations

import torch

from wanstream.engine.denoise.local import Denoiser
from wanstream.engine.rng import SeededNoise
from wanstream.models.dit import WanConfig, WanDiT
from wanstream.models.kv_cache import KVCache, KVCacheConfig
from wanstream.models.scheduler import FlowMatchScheduler

# The official diffusion_pytorch_model.safetensors keys of Wan2.1-T2V-1.3B (825 tensors).
OFFICIAL_TOP_LEVEL = [
    "patch_embedding.weight",
    "patch_embedding.bias",
    "text_embedding.0.weight",
    "text_embedding.0.bias",
    "text_embedding.2.weight",
    "text_embedding.2.bias",
    "time_embedding.0.weight",
    "time_embedding.0.bias",
    "time_embedding.2.weight",
    "time_embedding.2.bias",
    "time_projection.1.weight",
    "time_projection.1.bias",
    "head.modulation",
    "head.head.weight",
    "head.head.bias",
]
OFFICIAL_BLOCK = [
    "modulation",
    "self_attn.q.weight",
    "self_attn.q.bias",
    "self_attn.k.weight",
    "self_attn.k.bias",
    "self_attn.v.weight",
    "self_attn.v.bias",
    "self_attn.o.weight",
    "self_attn.o.bias",
    "self_attn.norm_q.weight",
    "self_attn.norm_k.weight",
    "norm3.weight",
    "norm3.bias",
    "cross_attn.q.weight",
    "cross_attn.q.bias",
    "cross_attn.k.weight",
    "cross_attn.k.bias",
    "cross_attn.v.weight",
    "cross_attn.v.bias",
    "cross_attn.o.weight",
    "cross_attn.o.bias",
    "cross_attn.norm_q.weight",
    "cross_attn.norm_k.weight",
    "ffn.0.weight",
    "ffn.0.bias",
    "ffn.2.weight",
    "ffn.2.bias",
]


def official_keys(num_layers: int) -> set[str]:
    return set(OFFICIAL_TOP_LEVEL) | {f"blocks.{i}.{k}" for i in range(num_layers) for k in OFFICIAL_BLOCK}


def test_full_size_1_3b_on_meta_matches_the_official_checkpoint() -> None:
    with torch.device("meta"):
        model = WanDiT(WanConfig.t2v_1_3b())
    sd = model.state_dict()
    assert len(sd) == 825
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800
    assert set(sd) == official_keys(30)
    assert tuple(sd["patch_embedding.weight"].shape) == (1536, 16, 1, 2, 2)
    assert tuple(sd["blocks.0.ffn.0.weight"].shape) == (8960, 1536)
    assert tuple(sd["head.head.weight"].shape) == (64, 1536)
    assert tuple(sd["text_embedding.0.weight"].shape) == (1536, 4096)


def test_full_size_14b_config_on_meta() -> None:
    with torch.device("meta"):
        model = WanDiT(WanConfig.t2v_14b())
    assert set(model.state_dict()) == official_keys(40)
    assert model.config.head_dim == 128


def test_config_json_without_ignored_keys_uses_the_defaults() -> None:
    # diffusers' config.json omits patch_size, cross_attn_norm, qk_norm, text_dim and window_size.
    cfg = WanConfig.from_dict(
        {"_class_name": "WanModel", "dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v",
         "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512, "eps": 1e-06}
    )  # fmt: skip
    assert cfg == WanConfig.t2v_1_3b()


def tiny_model(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_len=16, text_dim=24, freq_dim=32)
    model = WanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # the official init zeroes the head; random weights everywhere
            p.normal_(0, 0.2)
    return model.eval()


@torch.inference_mode()
def test_one_chunk_through_an_empty_cache_equals_the_bidirectional_forward() -> None:
    model = tiny_model()
    x = torch.randn(1, 16, 2, 6, 8)  # [B, C, F, H, W]
    ctx = torch.randn(1, 5, 24)
    t = torch.tensor([640.0])
    full = model.forward_full([x[0]], t, [ctx[0]])[0]
    L = 3 * 4
    cache = KVCache(KVCacheConfig(num_layers=2, num_heads=2, head_dim=32, frame_tokens=L, num_frames=6))
    plan = cache.plan([0], frames=2)
    stream = model.forward_stream(
        x.transpose(1, 2), torch.full((1, 2), 640), model.cross_kv(ctx), cache, plan
    )
    torch.testing.assert_close(stream.transpose(1, 2)[0], full, rtol=1e-5, atol=1e-5)


def one_layer_model() -> WanDiT:
    torch.manual_seed(3)
    cfg = WanConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=1, text_len=16, text_dim=24, freq_dim=32)
    model = WanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@torch.inference_mode()
def test_cached_frames_equal_the_last_frame_of_a_full_forward() -> None:
    """With one layer, frame f streamed through the cache sees exactly frames 0..f: the same keys the
    last frame of a bidirectional forward over frames 0..f sees."""
    model = one_layer_model()
    frames = torch.randn(1, 4, 16, 6, 8)  # [B, F, C, H, W]
    ctx = torch.randn(1, 5, 24)
    cross = model.cross_kv(ctx)
    L = 12
    cache = KVCache(KVCacheConfig(num_layers=1, num_heads=2, head_dim=32, frame_tokens=L, num_frames=6))
    for f in range(4):
        plan = cache.plan([f * L], frames=1)
        streamed = model.forward_stream(frames[:, f : f + 1], torch.full((1, 1), 500), cross, cache, plan)
        clip = frames[0, : f + 1].transpose(0, 1)  # [C, f+1, H, W]
        full = model.forward_full([clip], torch.tensor([500.0]), [ctx[0]])[0]
        torch.testing.assert_close(streamed[0, 0], full[:, f], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_stream_batch_and_no_batch_agree_on_the_first_chunk() -> None:
    """Both modes run the same `prepare` on chunk 0, so its x0 is identical."""
    model = tiny_model(2)
    sched = FlowMatchScheduler()
    ctx = torch.randn(1, 5, 24)
    noisy = torch.randn(1, 2, 16, 6, 8)
    results = []
    for batching in ("none", "stream"):
        cache = KVCache(KVCacheConfig(num_layers=2, num_heads=2, head_dim=32, frame_tokens=12, lanes=2))
        den = Denoiser(model, sched, cache, SeededNoise(7), [700, 500], batching)
        den.reset()
        [done] = den.first_chunk(noisy, 0, model.cross_kv(ctx))
        results.append(done.x0)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
