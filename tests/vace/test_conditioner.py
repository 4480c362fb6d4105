"""VaceConditioner on the tiny demo pipeline: chunking, masks, references, scale, modes, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from wanstream.engine.components import Components
from wanstream.engine.session import SessionError, StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.engine.vace import (
    VaceConditioner,
    VaceInputError,
    WanVaceEncoder,
    extension_frames,
    fill_crop,
    image_pixels,
    mask_channels,
)
from wanstream.media.images import ImageReadError, read_image
from wanstream.models.vae import VAEEncodeState

from support.clips import write_png

H, W = 32, 48


def frames_u8(t: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(t, H, W, 3, generator=gen) * 255).to(torch.uint8)


def inpaint(t: int) -> torch.Tensor:
    """[T, H, W]: generate (1) in the centre, keep (0) around it, a soft 0.7 ring between."""
    m = torch.zeros(t, H, W)
    m[:, 8:24, 8:40] = 0.7
    m[:, 12:20, 16:32] = 1.0
    return m


def session(components: Components, **overrides) -> StreamSession:
    settings = StreamSettings(
        height=H,
        width=W,
        mode="text",
        batching="none",
        cache_context="clean",
        eviction="fifo",
        sink_threshold=-1.0,
        seed=11,
        **overrides,
    )
    return StreamSession(components, settings, prompts=["a cat in the rain"], output="float")


class Spy:
    """Wraps the real encoder and records (frames in, one-off or cached, which state)."""

    def __init__(self, components: Components) -> None:
        self.inner = WanVaceEncoder(components.wan_vae)
        self.calls: list[tuple[int, bool, int | None]] = []

    def __call__(self, pixels: torch.Tensor, state: VAEEncodeState | None) -> torch.Tensor:
        self.calls.append((pixels.shape[2], state is not None, None if state is None else id(state)))
        return self.inner(pixels, state)


def attached(components: Components, **kwargs) -> tuple[StreamSession, VaceConditioner, Spy]:
    s = session(components)
    spy = Spy(components)
    cond = VaceConditioner(s, encoder=spy, **kwargs)
    s.attach(cond)
    return s, cond, spy


# ------------------------------------------------------------------------------------------------
def test_control_stream_is_chunked_like_the_main_input(vace_components: Components) -> None:
    s, cond, spy = attached(vace_components)
    clip = frames_u8(15)
    outs = [cond.push(clip[:3]), cond.push(clip[3:11], inpaint(8)), cond.push(clip[11:])]
    assert [o.shape[0] for o in outs] == [0, 9, 4]  # 5 frames for the first chunk, then 4
    assert cond.pending_control == 2
    last = cond.flush()  # 2 real frames, padded to 4, output trimmed
    assert last.shape[0] == 2
    assert [(c.mode, c.control_frames, c.context_frames) for c in cond.history] == [
        ("conditioning", 5, 2),
        ("conditioning", 4, 1),
        ("conditioning", 4, 1),
        ("conditioning", 4, 1),
    ]
    # Chunks 0-2 hold inpainting masks (frames 3..10) → the reactive encode is one-off; the flushed
    # chunk has none (ones) → both cached.
    assert [c[:2] for c in spy.calls] == [
        (5, True),
        (5, False),
        (4, True),
        (4, False),
        (4, True),
        (4, False),
        (4, True),
        (4, True),
    ]
    assert s.frames_out == 15 and cond.pending_control == 0
    assert cond.frames_needed == 5  # flush ended the stream


def test_inactive_and_reactive_share_one_encoder_cache_like_scope_unless_separate(vace_components) -> None:
    _, cond, spy = attached(vace_components)
    cond.push(frames_u8(9))
    states = {c[2] for c in spy.calls}
    assert len(states) == 1
    _, cond, spy = attached(vace_components, vae_cache="separate")
    cond.push(frames_u8(9))
    assert len({c[2] for c in spy.calls}) == 2


def test_scale_zero_reproduces_the_no_vace_output_exactly(vace_components: Components) -> None:
    # "No VACE" = the VACE wrapper loaded, no inputs: Scope still uses its float32 time sinusoid then.
    plain_session, _, _ = attached(vace_components)
    reference = plain_session.generate(3)
    _, cond, _ = attached(vace_components, scale=0.0)
    zero = cond.push(frames_u8(13), inpaint(13))
    assert [c.mode for c in cond.history] == ["conditioning"] * 3
    assert torch.equal(zero, reference)
    _, cond, _ = attached(vace_components, scale=1.0)
    assert not torch.allclose(cond.push(frames_u8(13), inpaint(13)), reference)
    # Without the conditioner (plain DiT, float64 sinusoid) the output differs only by rounding.
    bare = session(vace_components).generate(3)
    assert torch.allclose(bare, reference, atol=1e-3) and not torch.equal(bare, reference)


def test_scale_changes_on_the_fly_from_the_next_chunk(vace_components: Components) -> None:
    _, cond, _ = attached(vace_components)
    clip = frames_u8(13)
    cond.push(clip[:5])
    cond.set_scale(0.25)
    cond.push(clip[5:9])
    cond.set_scale(2.0)
    cond.push(clip[9:])
    assert [c.scale for c in cond.history] == [1.0, 0.25, 2.0]


def test_a_reference_image_changes_the_output_and_is_encoded_once(vace_components, tmp_path: Path) -> None:
    ref = read_image(write_png(tmp_path / "ref.png", frames_u8(1, seed=5)[0, :20, :24]))
    base_session, _, _ = attached(vace_components)
    base = base_session.generate(3)
    s, cond, spy = attached(vace_components)
    cond.set_reference_images([ref], persist=True)
    out = s.generate(3)
    assert not torch.allclose(out, base)
    assert [c.mode for c in cond.history] == ["r2v"] * 3
    assert [c.encodes for c in cond.history] == [1, 0, 0]  # encoded once, reused
    assert spy.calls == [(1, False, None)]
    # One-shot (Scope's default): the next chunk only.
    s, cond, _ = attached(vace_components)
    cond.set_reference_images([ref])
    s.generate(2)
    assert [c.mode for c in cond.history] == ["r2v", "none"]


def test_reference_with_control_frames_is_prepended_then_truncated(vace_components, tmp_path: Path) -> None:
    _, cond, spy = attached(vace_components)
    cond.set_reference_images([frames_u8(1, seed=3)[0]], persist=True)
    cond.push(frames_u8(9))
    # Chunk 0: ref + 2 latents = 3 context frames; chunk 1: ref + 1 (the chunk keeps the first only).
    assert [(c.mode, c.references, c.context_frames) for c in cond.history] == [
        ("conditioning", 1, 3),
        ("conditioning", 1, 2),
    ]
    assert [c[:2] for c in spy.calls] == [(5, True), (5, True), (1, False), (4, True), (4, True)]


def test_first_and_last_frame_modes(vace_components: Components) -> None:
    s, cond, spy = attached(vace_components)
    image = frames_u8(1, seed=9)[0]
    cond.set_first_frame(image)
    s.generate(1)
    cond.set_last_frame(image)
    s.generate(1)
    s.generate(1)
    modes = [(c.mode, c.context_frames) for c in cond.history]
    # On the 2-latent first chunk the 4-frame group gives a 1-frame context (zero-filled, as Scope).
    assert modes == [("extension:firstframe", 1), ("extension:lastframe", 1), ("none", 0)]
    assert [c[:2] for c in spy.calls] == [(4, True), (4, False), (4, True), (4, False)]
    with pytest.raises(VaceInputError, match="firstlastframe"):
        cond.set_first_frame(image)
        cond.set_last_frame(image)


def test_extension_frames_composite_over_control_frames() -> None:
    ref = torch.full((3, 16, 16), 0.5)
    frames = torch.zeros(3, 5, 16, 16)
    masks = torch.zeros(1, 5, 16, 16)
    masks[..., :8] = 1.0
    out, keep = extension_frames(ref, at_end=False, frames=frames, masks=masks)
    assert out.shape == (3, 4, 16, 16) and torch.count_nonzero(keep) == 0
    assert torch.equal(out[..., :8], torch.full((3, 4, 16, 8), 0.5))  # reference where the mask is on
    assert torch.count_nonzero(out[..., 8:]) == 0
    plain, keep = extension_frames(ref, at_end=True)
    assert torch.equal(plain, ref[:, None].expand(-1, 4, -1, -1)) and torch.count_nonzero(keep) == 0


def test_mask_channels_follow_scopes_layout() -> None:
    # Each pixel holds its position inside its 8×8 block: channel c must read c everywhere.
    rows = torch.arange(16)[:, None] % 8
    cols = torch.arange(24)[None, :] % 8
    frame = (rows * 8 + cols).float()
    masks = torch.stack([frame + 100 * t for t in range(5)])[None]
    m0 = mask_channels(masks)
    assert m0.shape == (64, 2, 2, 3)
    for c in (0, 9, 63):
        assert torch.equal(m0[c, 0], torch.full((2, 3), c + 100.0))  # frames 1 and 3 (nearest-exact)
        assert torch.equal(m0[c, 1], torch.full((2, 3), c + 300.0))
    assert torch.equal(mask_channels(masks[:, 1:])[5, 0], torch.full((2, 3), 5 + 300.0))  # 4 frames → 3rd


def test_encoder_quirks(vace_components: Components) -> None:
    vae = vace_components.wan_vae
    enc = WanVaceEncoder(vae)
    x = frames_u8(4).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    # A one-off encode of a 4-frame chunk sees its first frame only (Scope's use_cache=False).
    assert torch.equal(enc(x, None), vae.encode(x[:, :, :1]))
    # A cached stream that begins on a 4-frame chunk: one latent, and the stream goes on.
    state = VAEEncodeState()
    assert enc(x, state).shape[2] == 1 and state.started
    assert enc(x, state).shape[2] == 1


def test_images_are_read_and_fitted_like_scope(tmp_path: Path) -> None:
    image = frames_u8(1, seed=2)[0, :12, :20]
    path = write_png(tmp_path / "a.png", image)
    assert torch.equal(read_image(path), image)
    pixels = image_pixels(read_image(path))
    assert torch.equal(pixels, ((image.float() / 255 - 0.5) / 0.5).permute(2, 0, 1))
    fitted = fill_crop(pixels, 32, 48)  # scale max(32/12, 48/20) = 2.67 → 32x53, centre crop
    assert fitted.shape == (3, 32, 48)
    assert image_pixels(torch.ones(4, 4)).shape == (3, 4, 4)
    # The engine reads no files: a path is refused with the function that reads it named.
    with pytest.raises(VaceInputError, match=r"media\.images\.read_image"):
        image_pixels(path)
    not_an_image = tmp_path / "b.png"
    not_an_image.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    for bad, message in ((not_an_image, "cannot read this image"), (tmp_path / "none.png", "not found")):
        with pytest.raises(ImageReadError, match=message):
            read_image(bad)


# ------------------------------------------------------------------------------------------------
# Bad input: rejected before any work, the stream untouched
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_are_rejected_before_any_work(vace_components: Components, tmp_path: Path) -> None:
    s, cond, spy = attached(vace_components)
    cond.push(frames_u8(7))  # one chunk done, 2 frames queued
    before = (s.frames_out, cond.pending_control, len(cond.history), len(spy.calls), cond.scale)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    bad = [
        (lambda: cond.push_control(frames_u8(4), torch.ones(4, H, W + 16)), "mask size mismatch"),
        (lambda: cond.push_control(frames_u8(4), torch.ones(3, H, W)), "mask size mismatch"),
        (lambda: cond.push_control(torch.zeros(4, H, W, 4)), "C = 3"),
        (lambda: cond.push_control(torch.zeros(1, 2, 4, H, W)), "C = 3"),
        (lambda: cond.push_control(torch.zeros(4, H, W)), r"\[T, H, W, C\]"),
        (lambda: cond.push_control(torch.full((4, H, W, 3), 1.5)), r"\[0, 1\]"),
        (lambda: cond.push_control(frames_u8(4), torch.full((4, H, W), 2.0)), r"\[0, 1\]"),
        (lambda: cond.push_control(torch.zeros(4, 30, W, 3)), "multiples of 16"),
        # Files are read outside the engine (media.images: its not-found / cannot-read errors are tested with it).
        (lambda: cond.set_reference_images([tmp_path / "missing.png"]), "not a path"),
        (lambda: cond.set_reference_images([torch.zeros(5, 5, 2)]), r"\[H, W, 3\]"),
        (lambda: cond.set_first_frame(tmp_path / "broken.png"), "not a path"),
        (lambda: cond.set_scale(2.5), r"\[0, 2\]"),
        (lambda: cond.set_scale(float("nan")), r"\[0, 2\]"),
        (lambda: cond.push(frames_u8(4), torch.ones(2, H, W)), "mask size mismatch"),
    ]
    for call, message in bad:
        with pytest.raises(VaceInputError, match=message):
            call()
        assert (s.frames_out, cond.pending_control, len(cond.history), len(spy.calls), cond.scale) == before
    unprompted = StreamSession(vace_components, s.settings)  # no prompt yet
    bare = VaceConditioner(unprompted)
    unprompted.attach(bare)
    with pytest.raises(VaceInputError, match="prompt"):
        bare.push(frames_u8(5))
    assert bare.pending_control == 0
    # The stream goes on exactly as if the bad inputs had never been given.
    after = cond.push(frames_u8(6, seed=1))
    _, cond2, _ = attached(vace_components)
    cond2.push(frames_u8(7))
    assert torch.equal(after, cond2.push(frames_u8(6, seed=1)))


def test_vace_needs_chunk_by_chunk_batching_and_text_mode_for_push(vace_components: Components) -> None:
    batched = StreamSession(vace_components, StreamSettings(height=H, width=W), prompts=["a cat"])
    cond = VaceConditioner(batched)
    with pytest.raises(SessionError, match="batching 'none'"):
        batched.attach(cond)
    with pytest.raises(VaceInputError, match="attach"):
        cond.push(frames_u8(5))
    video = StreamSession(
        vace_components, StreamSettings(height=H, width=W, batching="none"), prompts=["a cat"]
    )
    cond = VaceConditioner(video)
    video.attach(cond)
    with pytest.raises(VaceInputError, match="push_control"):
        cond.push(frames_u8(5))
    # Video mode: control frames ride along with the main input, chunk by chunk.
    cond.push_control(frames_u8(9))
    video.push(frames_u8(9, seed=4))
    assert [c.control_frames for c in cond.history] == [5, 4]
    no_vace = dataclasses.replace(vace_components, vace=None)
    without = StreamSession(no_vace, StreamSettings(height=H, width=W, batching="none"), prompts=["a cat"])
    with pytest.raises(VaceInputError, match="no VACE module"):
        VaceConditioner(without)


def test_control_frames_at_another_size_and_scope_layout(vace_components: Components) -> None:
    s, cond, _ = attached(vace_components)
    big = torch.rand(1, 1, 9, 64, 96) * 2 - 1  # Scope's [1, C, T, H, W], grey, 2x the stream's size
    cond.push(big, torch.ones(1, 1, 9, 64, 96))
    assert [c.control_frames for c in cond.history] == [5, 4]
    assert s.frames_out == 9


def test_a_conditioner_made_in_inference_mode_works_outside_it(vace_components: Components) -> None:
    """Made with its session inside `torch.inference_mode()` (a notebook cell, the server's engine thread) and
    driven outside it: the same frames as driven inside (the session runs its calls in the mode it was made in)."""

    def drive(inside: bool) -> torch.Tensor:
        with torch.inference_mode():
            s = session(vace_components)
            cond = VaceConditioner(s, scale=0.8)
            s.attach(cond)
            outs = [cond.push(frames_u8(5, 1))]
        with torch.inference_mode(inside):
            cond.set_reference_images([frames_u8(1, 2)[0].numpy()])
            cond.set_scale(1.5)
            outs.append(cond.push(frames_u8(4, 3)))
            cond.set_first_frame(frames_u8(1, 4)[0])
            outs.append(cond.push(frames_u8(4, 5), masks=inpaint(4)))
            cond.push_control(frames_u8(4, 6))
            outs.append(cond.flush())
            cond.clear()
        return torch.cat(outs)

    assert torch.equal(drive(inside=False), drive(inside=True))
