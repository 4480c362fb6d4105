"""The Wan VAE: official key layout at full size, golden cases, streaming == whole clip, normalisation, loading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanstream.conformance import GoldenCase, run_case
from wanstream.models.vae import (
    WAN_LATENT_MEAN,
    WAN_LATENT_STD,
    VAEDecodeState,
    VAEEncodeState,
    WanVAE,
    WanVAEConfig,
)
from wanstream.weights.loaders import CheckpointError
from wanstream.weights.vae import load_wan_vae

GOLDEN = Path(__file__).parents[1] / "golden"

# --- The official Wan2.1_VAE.pth key list (194 tensors), from the structure of Wan's `WanVAE_` ----------------
RES = [
    "residual.0.gamma",
    "residual.2.weight",
    "residual.2.bias",
    "residual.3.gamma",
    "residual.6.weight",
    "residual.6.bias",
]
SHORTCUT = ["shortcut.weight", "shortcut.bias"]
ATTN = ["norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"]
RESAMPLE = ["resample.1.weight", "resample.1.bias"]
TIME_CONV = ["time_conv.weight", "time_conv.bias"]
CONV = ["weight", "bias"]
HEAD = ["head.0.gamma", "head.2.weight", "head.2.bias"]
MIDDLE = [f"middle.0.{k}" for k in RES] + [f"middle.1.{k}" for k in ATTN] + [f"middle.2.{k}" for k in RES]
# encoder.downsamples: stages of 2 residual blocks, each followed by a resample (2: spatial, 5 and 8: + time).
ENCODER_LAYERS = {
    0: RES, 1: RES, 2: RESAMPLE,
    3: RES + SHORTCUT, 4: RES, 5: RESAMPLE + TIME_CONV,
    6: RES + SHORTCUT, 7: RES, 8: RESAMPLE + TIME_CONV,
    9: RES, 10: RES,
}  # fmt: skip
# decoder.upsamples: stages of 3 residual blocks, then a resample (3 and 7: + time, 11: spatial).
DECODER_LAYERS = {
    0: RES, 1: RES, 2: RES, 3: RESAMPLE + TIME_CONV,
    4: RES + SHORTCUT, 5: RES, 6: RES, 7: RESAMPLE + TIME_CONV,
    8: RES, 9: RES, 10: RES, 11: RESAMPLE,
    12: RES, 13: RES, 14: RES,
}  # fmt: skip
OFFICIAL_KEYS = (
    [f"encoder.conv1.{k}" for k in CONV]
    + [f"encoder.downsamples.{i}.{k}" for i, ks in ENCODER_LAYERS.items() for k in ks]
    + [f"encoder.{k}" for k in MIDDLE + HEAD]
    + [f"conv1.{k}" for k in CONV]
    + [f"conv2.{k}" for k in CONV]
    + [f"decoder.conv1.{k}" for k in CONV]
    + [f"decoder.{k}" for k in MIDDLE]
    + [f"decoder.upsamples.{i}.{k}" for i, ks in DECODER_LAYERS.items() for k in ks]
    + [f"decoder.{k}" for k in HEAD]
)

TINY = WanVAEConfig(dim=4, num_res_blocks=1)


def test_official_key_list_is_complete() -> None:
    assert len(OFFICIAL_KEYS) == len(set(OFFICIAL_KEYS)) == 194
    # The golden case holds a tiny WanVAE_ (num_res_blocks 2) saved by the reference: same keys as the release.
    recorded = {
        k.removeprefix("weights/")
        for k in load_file(GOLDEN / "vae_roundtrip.safetensors")
        if k.startswith("weights/")
    }
    assert recorded == set(OFFICIAL_KEYS)


def test_full_size_on_meta_matches_wan2_1_vae_pth() -> None:
    with torch.device("meta"):
        vae = WanVAE()
    sd = vae.state_dict()
    assert len(sd) == 194
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert set(sd) == set(OFFICIAL_KEYS)
    shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert (vae.encoder.num_slots, vae.decoder.num_slots) == (
        24,
        32,
    )  # the reference's 26 and 33 minus shortcuts


@pytest.mark.parametrize("name", ["vae_roundtrip", "vae_stream"])
def test_golden_case_passes(name: str) -> None:
    outcome = run_case(GoldenCase(GOLDEN / f"{name}.json"))
    failed = [f"{c.name}: {c.detail}" for c in outcome.report.checks if not c.passed]
    assert outcome.status == "PASS", outcome.message or "\n".join(failed)
    assert len([c for c in outcome.report.checks if c.rel_l2 is not None]) == len(
        GoldenCase(GOLDEN / f"{name}.json").manifest["calls"]
    )


# --- streaming ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(TINY).eval().requires_grad_(False)


def _video(seed: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 16, 24, generator=g) * 2 - 1


def _stream_encode(
    vae: WanVAE, video: torch.Tensor, state: VAEEncodeState, chunks: list[int]
) -> torch.Tensor:
    out, pos = [], 0
    for n in chunks:
        out.append(vae.stream_encode(video[:, :, pos : pos + n], state))
        pos += n
    assert pos == video.shape[2]
    return torch.cat(out, dim=2)


def test_stream_encode_equals_whole_clip_across_two_sessions(tiny: WanVAE) -> None:
    # Tolerance: exact (rtol = atol = 0) in float32, as the reference observed; the whole-clip encode runs
    # the same per-chunk computation on a fresh state.
    clip_a, clip_b = _video(1, 21), _video(2, 13)
    state = VAEEncodeState()
    parts = [tiny.stream_encode(clip_a[:, :, :5], state)]
    assert parts[0].shape == (1, 16, 2, 2, 3)  # 1 + 4 frames → 2 latents
    parts.append(tiny.stream_encode(clip_a[:, :, 5:9], state))
    assert parts[1].shape == (1, 16, 1, 2, 3)  # 4 → 1
    parts.append(_stream_encode(tiny, clip_a[:, :, 9:], state, [4, 8]))
    torch.testing.assert_close(torch.cat(parts, dim=2), tiny.encode(clip_a), rtol=0, atol=0)

    state.reset()
    streamed_b = _stream_encode(tiny, clip_b, state, [5, 4, 4])
    torch.testing.assert_close(streamed_b, tiny.encode(clip_b), rtol=0, atol=0)

    # The caches really carry over: continuing session A's state instead of resetting gives other latents.
    stale = VAEEncodeState()
    _stream_encode(tiny, clip_a, stale, [5, 4, 4, 8])
    assert not torch.allclose(tiny.stream_encode(clip_b[:, :, 1:5], stale), tiny.encode(clip_b)[:, :, 1:2])


def test_stream_decode_equals_whole_clip_across_two_sessions(tiny: WanVAE) -> None:
    g = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(1, 16, 6, 2, 3, generator=g), torch.randn(1, 16, 3, 2, 3, generator=g)
    state = VAEDecodeState()
    parts = [tiny.stream_decode(z_a[:, :, :2], state)]
    assert parts[0].shape == (1, 3, 5, 16, 24)  # 2 latents → 5 frames
    parts.append(tiny.stream_decode(z_a[:, :, 2:3], state))
    assert parts[1].shape == (1, 3, 4, 16, 24)  # 1 → 4
    parts.append(tiny.stream_decode(z_a[:, :, 3:], state))
    torch.testing.assert_close(torch.cat(parts, dim=2), tiny.decode(z_a), rtol=0, atol=0)

    state.reset()
    parts = [tiny.stream_decode(z_b[:, :, :2], state), tiny.stream_decode(z_b[:, :, 2:], state)]
    torch.testing.assert_close(torch.cat(parts, dim=2), tiny.decode(z_b), rtol=0, atol=0)

    unclamped = tiny.decode(z_b, clamp=False)
    torch.testing.assert_close(unclamped.clamp(-1, 1), tiny.decode(z_b), rtol=0, atol=0)


def test_one_vae_serves_interleaved_streams(tiny: WanVAE) -> None:
    clip_a, clip_b = _video(4, 9), _video(5, 9)
    sa, sb = VAEEncodeState(), VAEEncodeState()
    a = [tiny.stream_encode(clip_a[:, :, :5], sa)]
    b = [tiny.stream_encode(clip_b[:, :, :5], sb)]
    a.append(tiny.stream_encode(clip_a[:, :, 5:], sa))
    b.append(tiny.stream_encode(clip_b[:, :, 5:], sb))
    torch.testing.assert_close(torch.cat(a, 2), tiny.encode(clip_a), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(b, 2), tiny.encode(clip_b), rtol=0, atol=0)


def test_bad_stream_input_is_refused_and_the_state_stays_intact(tiny: WanVAE) -> None:
    clip = _video(6, 13)
    state = VAEEncodeState()
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        tiny.stream_encode(clip[:, :, :4], state)
    assert not state.started
    tiny.stream_encode(clip[:, :, :5], state)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny.stream_encode(clip[:, :, 5:8], state)
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        tiny.stream_encode(clip[:, :2, 5:9], state)
    with pytest.raises(ValueError, match=r"state\.reset"):
        tiny.stream_encode(_video(7, 8)[..., :8], state)
    with pytest.raises(TypeError, match="VAEEncodeState"):
        tiny.stream_encode(clip[:, :, 5:9], VAEDecodeState())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.encode(torch.zeros(1, 3, 5, 12, 16))
    rest = _stream_encode(tiny, clip[:, :, 5:], state, [4, 4])
    torch.testing.assert_close(rest, tiny.encode(clip)[:, :, 2:], rtol=0, atol=0)

    dstate = VAEDecodeState()
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        tiny.stream_decode(torch.zeros(1, 8, 1, 2, 3), dstate)
    with pytest.raises(TypeError, match="VAEDecodeState"):
        tiny.stream_decode(torch.zeros(1, 16, 1, 2, 3), state)  # type: ignore[arg-type]
    assert not dstate.started


# --- normalisation -----------------------------------------------------------------------------------
def test_normalisation_is_the_reference_arithmetic_and_round_trips(tiny: WanVAE) -> None:
    mean = torch.tensor(WAN_LATENT_MEAN).view(1, 16, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(WAN_LATENT_STD)).view(1, 16, 1, 1, 1)
    assert WAN_LATENT_MEAN[:3] == (-0.7571, -0.7089, -0.9113) and WAN_LATENT_STD[-1] == 1.9160
    golden = load_file(GOLDEN / "vae_roundtrip.safetensors")
    assert torch.equal(torch.tensor(WAN_LATENT_MEAN), golden["inputs/scale_mean"])
    assert torch.equal(torch.tensor(WAN_LATENT_STD), golden["inputs/scale_std"])

    mu = torch.randn(2, 16, 3, 2, 3, generator=torch.Generator().manual_seed(8)) * 3
    z = tiny.normalize(mu)
    assert torch.equal(z, (mu - mean) * inv_std)
    assert torch.equal(tiny.denormalize(z), z / inv_std + mean)  # a division by the float32 reciprocal
    torch.testing.assert_close(tiny.denormalize(z), mu, rtol=1e-6, atol=1e-6)
    # The golden pair: WanVAE.encode (normalised) and WanVAE_.encode(video, [0, 1]) (raw mu).
    torch.testing.assert_close(
        tiny.normalize(golden["outputs/encode_mu_raw"]), golden["outputs/encode_latent"], rtol=0, atol=1e-6
    )


# --- loading -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tiny: WanVAE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny.state_dict().items()}


def test_load_from_pth_safetensors_and_memory(tmp_path: Path, tiny: WanVAE, tiny_sd: dict) -> None:
    torch.save(tiny_sd, tmp_path / "Wan2.1_VAE.pth")
    save_file(tiny_sd, str(tmp_path / "vae.safetensors"))
    clip = _video(9, 5)
    expected = tiny.encode(clip)
    for source in (tmp_path / "Wan2.1_VAE.pth", str(tmp_path / "vae.safetensors"), tiny_sd):
        vae = load_wan_vae(source, TINY, dtype=torch.float32)
        assert not any(p.requires_grad for p in vae.parameters())
        torch.testing.assert_close(vae.encode(clip), expected, rtol=0, atol=0)
    assert load_wan_vae(tiny_sd, TINY).dtype == torch.bfloat16  # the pipeline's default


def test_bad_checkpoints_name_the_file_and_keys(tmp_path: Path, tiny_sd: dict) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"

    missing = {k: v for k, v in tiny_sd.items() if k != "decoder.head.2.bias"}
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth.*missing keys: decoder\.head\.2\.bias"):
        load_wan_vae(path, TINY)

    wrong = dict(tiny_sd, **{"encoder.conv1.weight": torch.zeros(5, 3, 3, 3, 3)})
    torch.save(wrong, path)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth.*wrong shapes: encoder\.conv1\.weight"):
        load_wan_vae(path, TINY)

    torch.save(tiny_sd, path)
    # Without a config the width is read off the weights (like the text encoder's loader) ...
    assert load_wan_vae(path, dtype=torch.float32).config == TINY
    # ... but an explicit config is enforced.
    with pytest.raises(
        CheckpointError, match=r"Wan2\.1_VAE\.pth.*wrong shapes: encoder\.conv1\.weight \(file \(4, "
    ):
        load_wan_vae(path, WanVAEConfig())  # a tiny file against the full-size config

    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: not a state dict"):
        load_wan_vae(path, TINY)
    torch.save({"state_dict": tiny_sd}, path)
    with pytest.raises(
        CheckpointError, match=r"Wan2\.1_VAE\.pth: not a state dict of tensors .*'state_dict'"
    ):
        load_wan_vae(path, TINY)

    torch.save(tiny_sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: not a readable checkpoint"):
        load_wan_vae(path, TINY)

    st = tmp_path / "vae.safetensors"
    save_file(tiny_sd, str(st))
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: not a readable checkpoint"):
        load_wan_vae(st, TINY)

    with pytest.raises(CheckpointError, match=r"my-vae: .*unexpected keys: extra"):
        load_wan_vae(dict(tiny_sd, extra=torch.zeros(1)), TINY, source="my-vae")


def test_config_from_reference_constructor_args() -> None:
    args = {
        "dim": 6,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
    }
    cfg = WanVAEConfig.from_dict(args)
    assert cfg == WanVAEConfig(dim=6)
    assert (cfg.time_stride, cfg.space_stride) == (4, 8)
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAEConfig.from_dict({**args, "attn_scales": [0.5]})
    with pytest.raises(ValueError, match="unknown Wan VAE config keys: bogus"):
        WanVAEConfig.from_dict({**args, "bogus": 1})


# --- compiled halves: which calls may use them --------------------------------------------------------
class _Recording(torch.nn.Module):
    """Stands in for a compiled encoder/decoder: runs the eager module and records each call's input shape."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x: torch.Tensor, state: object) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.inner(x, state)


def test_only_a_sessions_first_part_runs_eagerly() -> None:
    """After a reset, frame 0 / latent 0 run eagerly (a one-off shape); the first call's second part (frames 1-4,
    latent 1) already runs on the compiled halves, with the same result as the eager VAE."""
    from wanstream.models.vae import _CompiledHalves

    torch.manual_seed(0)
    vae = WanVAE(TINY).eval().requires_grad_(False)
    reference = WanVAE(TINY).eval().requires_grad_(False)
    reference.load_state_dict(vae.state_dict())
    enc, dec = _Recording(vae.encoder), _Recording(vae.decoder)
    vae._compiled = _CompiledHalves(enc, dec, background=False)
    clip = _video(3, 13)
    for _ in range(2):  # a stream, a reset, the same stream again
        enc.calls.clear()
        dec.calls.clear()
        state, ref_state = VAEEncodeState(), VAEEncodeState()
        first = vae.stream_encode(clip[:, :, :5], state)
        assert enc.calls == [(1, 3, 4, 16, 24)]
        torch.testing.assert_close(first, reference.stream_encode(clip[:, :, :5], ref_state), rtol=0, atol=0)
        later = vae.stream_encode(clip[:, :, 5:9], state)
        assert enc.calls == [(1, 3, 4, 16, 24)] * 2
        torch.testing.assert_close(later, reference.stream_encode(clip[:, :, 5:9], ref_state), rtol=0, atol=0)
        dstate, ref_dstate = VAEDecodeState(), VAEDecodeState()
        z = torch.randn(1, 16, 3, 2, 3)
        frames = vae.stream_decode(z[:, :, :2], dstate)
        assert dec.calls == [(1, 16, 1, 2, 3)]
        torch.testing.assert_close(frames, reference.stream_decode(z[:, :, :2], ref_dstate), rtol=0, atol=0)
        vae.stream_decode(z[:, :, 2:], dstate)
        assert len(dec.calls) == 2


def test_a_stream_start_does_not_recompile_the_compiled_halves() -> None:
    """Dynamo guards on every stride: the first call's second part must reach the compiled halves with the
    layout the warm-up compiled for (a slice of the 5-frame input has another batch stride: ~2 s of recompile
    on every stream start, measured on an H100). Dynamo's guards are the same with any backend, so the
    'eager' backend checks it on the CPU; a recompile raises, and would show as a compile fallback."""
    import torch._dynamo

    from wanstream.models.fastpath import FALLBACKS, CompiledOrEager
    from wanstream.models.vae import _CompiledHalves

    torch._dynamo.reset()
    # A config module's switch: patched for this test only (monkeypatch's undo deleted it — later compiles in
    # the process then failed on "error_on_recompile does not exist").
    with torch._dynamo.config.patch(error_on_recompile=True):
        FALLBACKS.clear()
        torch.manual_seed(0)
        vae = WanVAE(TINY).eval().requires_grad_(False)
        reference = WanVAE(TINY).eval().requires_grad_(False)
        reference.load_state_dict(vae.state_dict())
        vae.optimize(channels_last=True, compile=False)
        reference.optimize(channels_last=True, compile=False)
        vae._compiled = _CompiledHalves(
            CompiledOrEager(
                torch.compile(vae.encoder, backend="eager", dynamic=False), vae.encoder, "encoder"
            ),
            CompiledOrEager(
                torch.compile(vae.decoder, backend="eager", dynamic=False), vae.decoder, "decoder"
            ),
            background=False,
        )
        clip = _video(3, 13)
        z = torch.randn(1, 16, 3, 2, 3)
        for _ in range(3):  # the first stream compiles; a reset, and the next ones must not recompile
            state, ref_state = VAEEncodeState(), VAEEncodeState()
            for part in (clip[:, :, :5], clip[:, :, 5:9], clip[:, :, 9:13]):
                torch.testing.assert_close(
                    vae.stream_encode(part, state), reference.stream_encode(part, ref_state)
                )
            dstate, ref_dstate = VAEDecodeState(), VAEDecodeState()
            for part in (z[:, :, :2], z[:, :, 2:]):
                torch.testing.assert_close(
                    vae.stream_decode(part, dstate), reference.stream_decode(part, ref_dstate)
                )
        assert FALLBACKS.total() == 0, FALLBACKS.snapshot()
        torch._dynamo.reset()


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
def test_background_compile_serves_the_stream_without_compiling_again_in_line(
    monkeypatch, inference: bool
) -> None:
    """The compiled halves are compiled and warmed up on their own thread, in the stream's mode and on inputs
    like the stream's: dynamo guards on both, and a warm-up under inference mode for a stream pushed outside it
    (as `bench` and scripts push) left the stream's thread to compile each half again, in line."""
    import threading

    import torch._dynamo

    from wanstream.models.fastpath import GIL

    compiled_on: list[str] = []
    intervals: list[float] = []  # the interpreter's switch interval while each compiled

    def counting(gm, example_inputs):
        compiled_on.append(threading.current_thread().name)
        intervals.append(sys.getswitchinterval())
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting, dynamic=False))
    torch._dynamo.reset()
    before = sys.getswitchinterval()
    try:
        torch.manual_seed(0)
        vae = WanVAE(TINY).eval().requires_grad_(False).optimize(channels_last=True, compile=True)
        clip = _video(3, 1 + 4 * 6)
        with torch.inference_mode(inference):
            enc, dec = VAEEncodeState(), VAEDecodeState()
            z = vae.stream_encode(clip[:, :, :5], enc)
            vae.stream_decode(vae.normalize(z), dec)
            for i in range(6):  # eager calls while the halves compile, then compiled ones
                z = vae.stream_encode(clip[:, :, 1 + 4 * i : 5 + 4 * i], enc)
                vae.stream_decode(vae.normalize(z), dec)
                if i == 1:
                    assert vae.wait_compiled(120)
        assert compiled_on and all(name.startswith("compile-") for name in compiled_on), compiled_on
        # The stream's thread got the GIL back sooner while the halves compiled, and no later.
        assert intervals == pytest.approx([min(before, GIL.switch_s)] * len(intervals))
        assert sys.getswitchinterval() == before
    finally:
        torch._dynamo.reset()
