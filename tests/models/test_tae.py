"""TAEHV: the official taew2_1 layout at full size, the golden case, and the streaming conventions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wanstream.conformance import GoldenCase, run_case
from wanstream.models.tae import (
    TAEHV,
    WAN_LATENT_MEAN,
    TAEDecodeState,
    TAEEncodeState,
    TAEHVConfig,
    TAEWindowedDecodeState,
    taehv_from_wan_mu,
    wan_mu_from_taehv,
)
from wanstream.weights.loaders import CheckpointError
from wanstream.weights.tae import load_taehv

GOLDEN = Path(__file__).parents[1] / "golden" / "tae_roundtrip.json"

# Every tensor of the official taew2_1.pth (madebyollin/taehv), with its full-size shape.
OFFICIAL_TAEW2_1 = """
encoder.0.weight 64 3 3 3
encoder.0.bias 64
encoder.2.conv.weight 64 128 1 1
encoder.3.weight 64 64 3 3
encoder.4.conv.0.weight 64 128 3 3
encoder.4.conv.0.bias 64
encoder.4.conv.2.weight 64 64 3 3
encoder.4.conv.2.bias 64
encoder.4.conv.4.weight 64 64 3 3
encoder.4.conv.4.bias 64
encoder.5.conv.0.weight 64 128 3 3
encoder.5.conv.0.bias 64
encoder.5.conv.2.weight 64 64 3 3
encoder.5.conv.2.bias 64
encoder.5.conv.4.weight 64 64 3 3
encoder.5.conv.4.bias 64
encoder.6.conv.0.weight 64 128 3 3
encoder.6.conv.0.bias 64
encoder.6.conv.2.weight 64 64 3 3
encoder.6.conv.2.bias 64
encoder.6.conv.4.weight 64 64 3 3
encoder.6.conv.4.bias 64
encoder.7.conv.weight 64 128 1 1
encoder.8.weight 64 64 3 3
encoder.9.conv.0.weight 64 128 3 3
encoder.9.conv.0.bias 64
encoder.9.conv.2.weight 64 64 3 3
encoder.9.conv.2.bias 64
encoder.9.conv.4.weight 64 64 3 3
encoder.9.conv.4.bias 64
encoder.10.conv.0.weight 64 128 3 3
encoder.10.conv.0.bias 64
encoder.10.conv.2.weight 64 64 3 3
encoder.10.conv.2.bias 64
encoder.10.conv.4.weight 64 64 3 3
encoder.10.conv.4.bias 64
encoder.11.conv.0.weight 64 128 3 3
encoder.11.conv.0.bias 64
encoder.11.conv.2.weight 64 64 3 3
encoder.11.conv.2.bias 64
encoder.11.conv.4.weight 64 64 3 3
encoder.11.conv.4.bias 64
encoder.12.conv.weight 64 64 1 1
encoder.13.weight 64 64 3 3
encoder.14.conv.0.weight 64 128 3 3
encoder.14.conv.0.bias 64
encoder.14.conv.2.weight 64 64 3 3
encoder.14.conv.2.bias 64
encoder.14.conv.4.weight 64 64 3 3
encoder.14.conv.4.bias 64
encoder.15.conv.0.weight 64 128 3 3
encoder.15.conv.0.bias 64
encoder.15.conv.2.weight 64 64 3 3
encoder.15.conv.2.bias 64
encoder.15.conv.4.weight 64 64 3 3
encoder.15.conv.4.bias 64
encoder.16.conv.0.weight 64 128 3 3
encoder.16.conv.0.bias 64
encoder.16.conv.2.weight 64 64 3 3
encoder.16.conv.2.bias 64
encoder.16.conv.4.weight 64 64 3 3
encoder.16.conv.4.bias 64
encoder.17.weight 16 64 3 3
encoder.17.bias 16
decoder.1.weight 256 16 3 3
decoder.1.bias 256
decoder.3.conv.0.weight 256 512 3 3
decoder.3.conv.0.bias 256
decoder.3.conv.2.weight 256 256 3 3
decoder.3.conv.2.bias 256
decoder.3.conv.4.weight 256 256 3 3
decoder.3.conv.4.bias 256
decoder.4.conv.0.weight 256 512 3 3
decoder.4.conv.0.bias 256
decoder.4.conv.2.weight 256 256 3 3
decoder.4.conv.2.bias 256
decoder.4.conv.4.weight 256 256 3 3
decoder.4.conv.4.bias 256
decoder.5.conv.0.weight 256 512 3 3
decoder.5.conv.0.bias 256
decoder.5.conv.2.weight 256 256 3 3
decoder.5.conv.2.bias 256
decoder.5.conv.4.weight 256 256 3 3
decoder.5.conv.4.bias 256
decoder.7.conv.weight 256 256 1 1
decoder.8.weight 128 256 3 3
decoder.9.conv.0.weight 128 256 3 3
decoder.9.conv.0.bias 128
decoder.9.conv.2.weight 128 128 3 3
decoder.9.conv.2.bias 128
decoder.9.conv.4.weight 128 128 3 3
decoder.9.conv.4.bias 128
decoder.10.conv.0.weight 128 256 3 3
decoder.10.conv.0.bias 128
decoder.10.conv.2.weight 128 128 3 3
decoder.10.conv.2.bias 128
decoder.10.conv.4.weight 128 128 3 3
decoder.10.conv.4.bias 128
decoder.11.conv.0.weight 128 256 3 3
decoder.11.conv.0.bias 128
decoder.11.conv.2.weight 128 128 3 3
decoder.11.conv.2.bias 128
decoder.11.conv.4.weight 128 128 3 3
decoder.11.conv.4.bias 128
decoder.13.conv.weight 256 128 1 1
decoder.14.weight 64 128 3 3
decoder.15.conv.0.weight 64 128 3 3
decoder.15.conv.0.bias 64
decoder.15.conv.2.weight 64 64 3 3
decoder.15.conv.2.bias 64
decoder.15.conv.4.weight 64 64 3 3
decoder.15.conv.4.bias 64
decoder.16.conv.0.weight 64 128 3 3
decoder.16.conv.0.bias 64
decoder.16.conv.2.weight 64 64 3 3
decoder.16.conv.2.bias 64
decoder.16.conv.4.weight 64 64 3 3
decoder.16.conv.4.bias 64
decoder.17.conv.0.weight 64 128 3 3
decoder.17.conv.0.bias 64
decoder.17.conv.2.weight 64 64 3 3
decoder.17.conv.2.bias 64
decoder.17.conv.4.weight 64 64 3 3
decoder.17.conv.4.bias 64
decoder.19.conv.weight 128 64 1 1
decoder.20.weight 64 64 3 3
decoder.22.weight 3 64 3 3
decoder.22.bias 3
"""


def official_layout() -> dict[str, tuple[int, ...]]:
    rows = [line.split() for line in OFFICIAL_TAEW2_1.strip().splitlines()]
    return {name: tuple(int(d) for d in dims) for name, *dims in rows}


def test_full_size_taew2_1_on_meta_matches_the_official_checkpoint() -> None:
    with torch.device("meta"):
        model = TAEHV()
    sd = model.state_dict()
    assert len(sd) == 128
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_layout()
    assert sum(p.numel() for p in model.parameters()) == 11_315_539
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_470_928
    assert sum(p.numel() for p in model.decoder.parameters()) == 9_844_611


def test_golden_case_passes() -> None:
    outcome = run_case(GoldenCase(GOLDEN))
    failed = [f"{c.name}: {c.detail}" for c in outcome.report.checks if not c.passed]
    assert outcome.status == "PASS", outcome.message or "\n".join(failed)
    assert len(outcome.report.checks) >= 11


def test_config_from_the_golden_manifest() -> None:
    case = GoldenCase(GOLDEN)
    config = TAEHVConfig.from_dict(case.manifest["model_config"])
    assert config == TAEHVConfig.taew2_1(4)
    assert config.encoder_width == 16 and config.decoder_widths == (64, 32, 16, 16)
    with pytest.raises(ValueError, match="width_divisor"):
        TAEHVConfig.from_dict({"width_divisor": 4, "encoder_width": 32})
    with pytest.raises(ValueError, match="width_divisor 3"):
        TAEHVConfig.taew2_1(3)


# ------------------------------------------------------------------------------------------------
# Small seeded models
# ------------------------------------------------------------------------------------------------
def tiny(seed: int = 0, **overrides: object) -> TAEHV:
    torch.manual_seed(seed)
    config = TAEHVConfig(encoder_width=8, decoder_widths=(32, 16, 8, 8), **overrides)  # type: ignore[arg-type]
    model = TAEHV(config).eval().requires_grad_(False)
    with torch.no_grad():
        model.decoder[-1].bias.add_(0.5)  # frames around the middle of [0, 1], like a trained decoder
    return model


def golden_model() -> tuple[TAEHV, torch.Tensor]:
    case = GoldenCase(GOLDEN)
    config = TAEHVConfig.from_dict(case.manifest["model_config"])
    model = load_taehv(case.prefixed("weights/"), config, dtype=torch.float32)
    return model, case.tensor("inputs/stream_latents")


def test_parallel_equals_sequential() -> None:
    model = tiny()
    video = torch.rand(2, 12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    z = model.encode_video(video, parallel=True)
    assert z.shape == (2, 3, 16, 2, 2)
    torch.testing.assert_close(model.encode_video(video, parallel=False), z, atol=1e-5, rtol=0)
    frames = model.decode_video(z, parallel=True)
    assert frames.shape == (2, 12, 3, 16, 16)
    torch.testing.assert_close(model.decode_video(z, parallel=False), frames, atol=1e-5, rtol=0)


def test_encode_video_rejects_a_frame_count_that_is_not_a_multiple_of_4() -> None:
    with pytest.raises(ValueError, match="multiple of 4 frames, got 5"):
        tiny().encode_video(torch.rand(1, 5, 3, 16, 16))
    with pytest.raises(ValueError, match="NTCHW"):
        tiny().decode_video(torch.rand(1, 16, 2, 2, 2))


# ------------------------------------------------------------------------------------------------
# StreamDiffusionV2's windowed streaming decode
# ------------------------------------------------------------------------------------------------
def test_windowed_decode_first_call_is_the_tail_of_decode_video() -> None:
    model = tiny()
    z = torch.randn(1, 7, 16, 2, 2, generator=torch.Generator().manual_seed(2))
    state = TAEWindowedDecodeState()
    first = model.stream_decode_windowed(z[:, :3], state)
    expected = (model.decode_video(z[:, :3], parallel=False)[:, -(3 - 1) * 4 :] * 2 - 1).clamp(-1, 1)
    assert first.shape == (1, 8, 3, 16, 16)
    assert torch.equal(first, expected)
    # Later calls: [last 3 latents + new] decoded from scratch, the last 4·new frames emitted.
    second = model.stream_decode_windowed(z[:, 3:5], state)
    window = model.decode_video(z[:, 0:5], parallel=False)  # context = latents 0..2
    assert torch.equal(second, (window[:, -8:] * 2 - 1).clamp(-1, 1))
    third = model.stream_decode_windowed(z[:, 5:6], state)
    window = model.decode_video(z[:, 2:6], parallel=False)  # context = latents 2..4
    assert torch.equal(third, (window[:, -4:] * 2 - 1).clamp(-1, 1))
    # A reset starts a new session: the first-call rule again, no context.
    state.reset()
    again = model.stream_decode_windowed(z[:, 5:7], state)
    assert torch.equal(again, (model.decode_video(z[:, 5:7], parallel=False)[:, -4:] * 2 - 1).clamp(-1, 1))
    assert model.stream_decode_windowed(z[:, :1], TAEWindowedDecodeState()).shape[1] == 0


# ------------------------------------------------------------------------------------------------
# Fast streaming decode (MemBlock memory carried between calls)
# ------------------------------------------------------------------------------------------------
def test_fast_stream_decode_frame_counts() -> None:
    model = tiny()
    z = torch.randn(1, 8, 16, 2, 2)
    state = TAEDecodeState()
    counts = [model.stream_decode(z[:, a:b], state).shape[1] for a, b in ((0, 2), (2, 3), (3, 5), (5, 6))]
    assert counts == [4, 4, 8, 4]
    state.reset()
    assert model.stream_decode(z[:, :1], state).shape[1] == 0  # like the reference: (1 − 1)·4
    assert model.stream_decode(z[:, 1:2], state).shape[1] == 4


def test_fast_stream_decode_equals_the_whole_clip_decode() -> None:
    model = tiny()
    z = torch.randn(2, 12, 16, 2, 2, generator=torch.Generator().manual_seed(3))
    state = TAEDecodeState()
    chunks = [(0, 2), (2, 3), (3, 4), (4, 7), (7, 8), (8, 12)]
    streamed = torch.cat([model.stream_decode(z[:, a:b], state) for a, b in chunks], 1)
    whole = (model.decode_video(z)[:, 4:] * 2 - 1).clamp(-1, 1)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)


def test_fast_stream_decode_differs_from_the_windowed_one_only_by_the_truncated_past() -> None:
    model, z = golden_model()
    chunks = [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
    fast, windowed, wide = (
        TAEDecodeState(),
        TAEWindowedDecodeState(),
        TAEWindowedDecodeState(context_latents=8),
    )
    for a, b in chunks:
        ours = model.stream_decode(z[:, a:b], fast)
        ref = model.stream_decode_windowed(z[:, a:b], windowed)
        assert ours.shape == ref.shape
        diff = (ours - ref).abs()
        if b <= 4:  # the 3-latent window still covers the whole stream
            assert diff.max() < 1e-5
        else:
            assert 1e-3 < diff.max() < 0.2 and diff.mean() < 0.02
        # With a window as long as the decoder's receptive field (8 latents) the two agree.
        torch.testing.assert_close(
            model.stream_decode_windowed(z[:, a:b], wide, parallel=True), ours, atol=1e-5, rtol=0
        )


def test_stream_decode_rejects_a_changed_stream_and_keeps_its_state() -> None:
    model = tiny()
    z = torch.randn(1, 6, 16, 2, 2)
    state, clean = TAEDecodeState(), TAEDecodeState()
    model.stream_decode(z[:, :2], state)
    model.stream_decode(z[:, :2], clean)
    with pytest.raises(ValueError, match="reset the state"):
        model.stream_decode(torch.randn(1, 1, 16, 4, 4), state)
    with pytest.raises(ValueError, match="NTCHW"):
        model.stream_decode(torch.randn(1, 1, 8, 2, 2), state)
    torch.testing.assert_close(model.stream_decode(z[:, 2:3], state), model.stream_decode(z[:, 2:3], clean))


# ------------------------------------------------------------------------------------------------
# Streaming encode (the Wan encoder's chunk rule)
# ------------------------------------------------------------------------------------------------
def test_stream_encode_frame_count_rules() -> None:
    model = tiny()
    video = torch.rand(1, 21, 3, 16, 16) * 2 - 1
    state = TAEEncodeState()
    assert model.stream_encode(video[:, :5], state).shape == (1, 2, 16, 2, 2)
    assert model.stream_encode(video[:, 5:9], state).shape[1] == 1
    assert model.stream_encode(video[:, 9:17], state).shape[1] == 2
    state.reset()
    assert model.stream_encode(video[:, :9], state).shape[1] == 3
    with pytest.raises(ValueError, match="first call of a stream needs 1 \\+ 4k frames, got 4"):
        model.stream_encode(video[:, :4], TAEEncodeState())
    with pytest.raises(ValueError, match="multiple of 4 frames, got 5"):
        model.stream_encode(video[:, 9:14], state)
    with pytest.raises(ValueError, match="reset the state"):
        model.stream_encode(torch.rand(1, 4, 3, 32, 32), state)


def test_stream_encode_is_the_front_padded_whole_clip_encode_and_survives_bad_calls() -> None:
    model = tiny()
    video = torch.rand(1, 13, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    state = TAEEncodeState()
    parts = [model.stream_encode(video[:, :5], state)]
    with pytest.raises(ValueError):
        model.stream_encode(video[:, 5:8], state)  # rejected before anything changes
    parts += [model.stream_encode(video[:, 5:9], state), model.stream_encode(video[:, 9:13], state)]
    unit = (video * 0.5 + 0.5).clamp(0, 1)
    padded = torch.cat([unit[:, :1].expand(-1, 3, -1, -1, -1), unit], 1)  # frame 0 three more times in front
    torch.testing.assert_close(torch.cat(parts, 1), model.encode_video(padded), atol=1e-5, rtol=0)


def test_wan_mu_conversion() -> None:
    z = torch.randn(2, 3, 16, 2, 2)
    mu = wan_mu_from_taehv(z)
    torch.testing.assert_close(taehv_from_wan_mu(mu), z)
    zero = wan_mu_from_taehv(torch.zeros(1, 1, 16, 1, 1))
    assert zero.flatten().tolist() == pytest.approx(list(WAN_LATENT_MEAN))
    assert wan_mu_from_taehv(z.half()).dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def test_load_taehv_from_pth_and_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = tiny(5).state_dict()
    config = tiny(5).config
    torch.save(sd, tmp_path / "taew2_1.pth")
    save_file(sd, str(tmp_path / "taew2_1.safetensors"))
    for name in ("taew2_1.pth", "taew2_1.safetensors"):
        model = load_taehv(tmp_path / name, config, dtype=torch.float32)
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert next(load_taehv(sd, config).parameters()).dtype == torch.float16  # the default, as the reference


def test_load_taehv_trims_tgrow_weights_for_a_decoder_without_time_upscale() -> None:
    sd = tiny(6).state_dict()
    preview = TAEHVConfig(encoder_width=8, decoder_widths=(32, 16, 8, 8), decoder_time_upscale=(False, True))
    model = load_taehv(sd, preview, dtype=torch.float32)
    assert model.decoder[13].stride == 1
    assert torch.equal(model.decoder[13].conv.weight, sd["decoder.13.conv.weight"][-16:])  # the latest frame
    assert torch.equal(model.decoder[19].conv.weight, sd["decoder.19.conv.weight"])
    z = torch.randn(1, 3, 16, 2, 2)
    assert model.decode_video(z[:, :2]).shape == (1, 4, 3, 16, 16)
    # The reference's windowed decode slices a literal 4 frames per latent, also here (2 per latent).
    state = TAEWindowedDecodeState()
    assert model.stream_decode_windowed(z[:, :2], state).shape[1] == 4  # (2 − 1)·4 of 4 frames
    assert model.stream_decode_windowed(z[:, 2:3], state).shape[1] == 4  # 4 of the window's 6
    assert tuple(sd["decoder.13.conv.weight"].shape) == (32, 16, 1, 1)  # the caller's dict is untouched


def test_corrupt_or_mismatched_checkpoints_are_rejected(tmp_path: Path) -> None:
    sd = tiny(7).state_dict()
    config = tiny(7).config
    path = tmp_path / "taew2_1.pth"

    def rejected(bad: object, *match: str) -> None:
        torch.save(bad, path)
        with pytest.raises(CheckpointError) as info:
            load_taehv(path, config)
        for text in (str(path), *match):
            assert text in str(info.value)

    rejected(
        {k: v for k, v in sd.items() if k != "decoder.9.conv.2.bias"}, "missing keys: decoder.9.conv.2.bias"
    )
    rejected({**sd, "decoder.23.weight": torch.zeros(1)}, "unexpected keys: decoder.23.weight")
    rejected({**sd, "encoder.0.weight": torch.zeros(8, 3, 5, 5)}, "wrong shapes: encoder.0.weight")
    rejected(
        {**sd, "decoder.19.conv.weight": torch.zeros(24, 8, 1, 1)}, "wrong shapes: decoder.19.conv.weight"
    )
    rejected([1, 2, 3], "not a state dict")
    # A checkpoint of the full-size network into the tiny config: every width is wrong.
    with torch.device("meta"):
        full = {k: torch.zeros(v.shape) for k, v in TAEHV().state_dict().items()}
    rejected(full, "wrong shapes", "in all")
    torch.save(sd, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
        load_taehv(path, config)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_taehv(tmp_path / "missing.pth", config)
