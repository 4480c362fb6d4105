"""LoRAs through the engine: live scale changes take effect on the next chunk (event log) without
re-encoding prompts; a rejected change leaves the stream untouched; streams with different LoRAs share
one DiT correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wanstream import Pipeline
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.models.lora import linear_targets
from wanstream.weights.lora import LoraError

from support.clips import moving_clip
from support.lora_files import lora_state_dict, random_pairs, write_lora

SMALL = dict(height=32, width=48, batching="none")
CLIP = moving_clip(25)  # 5 + 5 × 4 frames: six chunks


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.demo()


@pytest.fixture(scope="module")
def files(pipe: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    shapes = linear_targets(pipe.components.dit)
    blocks = [name for name in shapes if name.startswith("blocks.")]
    text_kv = [name for name in blocks if name.endswith(("cross_attn.k", "cross_attn.v"))]
    bad = lora_state_dict(random_pairs(shapes, blocks[:3]), "wan-comfy")
    bad["diffusion_model.blocks.0.self_attn.qkv.lora_A.weight"] = torch.zeros(4, 64)
    return {
        "style": write_lora(
            folder / "style.safetensors", lora_state_dict(random_pairs(shapes, blocks), "kohya")
        ),
        "other": write_lora(
            folder / "other.safetensors", lora_state_dict(random_pairs(shapes, blocks, seed=5), "wan-comfy")
        ),
        "text_kv": write_lora(
            folder / "text_kv.safetensors", lora_state_dict(random_pairs(shapes, text_kv), "kohya")
        ),
        "bad": write_lora(folder / "bad.safetensors", bad),
    }


def chunks(
    session: StreamSession, clip: torch.Tensor = CLIP, updates: dict | None = None
) -> list[torch.Tensor]:
    """Push chunk by chunk (5 frames, then 4); `updates` maps a chunk index to an update made before it."""
    out, start, index = [], 0, 0
    while start < clip.shape[0]:
        if updates and index in updates:
            session.update(updates[index])
        n = session.chunk_frames
        out.append(session.push(clip[start : start + n]))
        start, index = start + n, index + 1
    return out


def count_encodes(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    encoder = pipe.components.text_encoder
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts: calls.append(len(texts)) or original(texts))
    return calls


def lora(path: Path, scale: float, mode: str | None = None) -> dict:
    return {"path": str(path), "scale": scale, **({"mode": mode} if mode else {})}


@pytest.mark.parametrize("mode", ["merged", "runtime"])
@pytest.mark.parametrize("which", ["style", "text_kv"])
def test_a_live_scale_change_takes_effect_on_the_next_chunk_without_re_encoding_prompts(
    pipe: Pipeline, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, mode: str, which: str
) -> None:
    path = files[which]  # "text_kv" adapts only the text keys/values: cached per prompt, so recomputed
    reference = chunks(pipe.session(prompts=["a red fox"], loras=[lora(path, 1.0, mode)], **SMALL))
    live = pipe.session(prompts=["a red fox"], loras=[lora(path, 1.0, mode)], **SMALL)
    encodes = count_encodes(pipe, monkeypatch)  # from here on: no prompt may go through the encoder
    out = chunks(live, updates={3: {"loras": [lora(path, 0.2, mode)]}})
    assert encodes == []
    assert all(torch.equal(a, b) for a, b in zip(out[:3], reference[:3]))
    assert not torch.equal(out[3], reference[3])  # the very next chunk runs with the new scale
    events = [e for e in live.events if e.kind == "input"]
    assert [e.loras[0][1] for e in events] == [1.0, 1.0, 1.0, 0.2, 0.2, 0.2]
    assert all(e.loras == ((str(path), e.loras[0][1], mode),) for e in events)
    assert not any(e.stream_start for e in events[1:])  # default lora_switch 'refresh': no restart


def test_stream_batch_applies_a_change_from_the_next_dit_call(pipe: Pipeline, files: dict[str, Path]) -> None:
    session = pipe.session(prompts=["x"], loras=[lora(files["style"], 1.0)], height=32, width=48)
    chunks(session, updates={2: {"loras": []}})
    events = [e for e in session.events if e.kind == "input"]
    assert [len(e.loras) for e in events] == [1, 1, 0, 0, 0, 0]
    assert pipe.components.loras.in_force == ()


def test_a_cut_restarts_the_stream_for_a_lora_change(pipe: Pipeline, files: dict[str, Path]) -> None:
    session = pipe.session(prompts=["x"], lora_switch="cut", **SMALL)
    out = chunks(session, updates={3: {"loras": [lora(files["style"], 0.7)]}})
    events = [e for e in session.events if e.kind == "input"]
    assert [e.stream_start for e in events] == [True, False, False, True, False]  # 5-frame chunk again
    assert sum(o.shape[0] for o in out) + session.flush().shape[0] == CLIP.shape[0]


@pytest.mark.parametrize("bad", ["bad", "missing"])
def test_a_rejected_lora_change_leaves_the_stream_untouched(
    pipe: Pipeline, files: dict[str, Path], bad: str, tmp_path: Path
) -> None:
    path = files["bad"] if bad == "bad" else tmp_path / "missing.safetensors"
    reference = chunks(pipe.session(prompts=["x"], loras=[lora(files["style"], 0.5)], **SMALL))
    session = pipe.session(prompts=["x"], loras=[lora(files["style"], 0.5)], **SMALL)
    settings = session.settings
    out = []
    for i, chunk in enumerate(chunks_iter(session)):
        if i == 2:
            with pytest.raises(LoraError) as err:
                session.update({"loras": [lora(files["style"], 0.9), lora(path, 1.0)]})
            assert ("self_attn.qkv" in str(err.value)) if bad == "bad" else ("not found" in str(err.value))
            assert session.settings is settings
        out.append(chunk())
    assert all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))


def chunks_iter(session: StreamSession):
    """Chunk thunks, so a test can act between chunks (the chunk size is read when each runs)."""
    start = 0
    while start < CLIP.shape[0]:

        def run() -> torch.Tensor:
            nonlocal start
            n = session.chunk_frames
            frames = CLIP[start : start + n]
            start += n
            return session.push(frames)

        yield run


def test_a_session_with_a_bad_lora_is_refused_at_creation(pipe: Pipeline, files: dict[str, Path]) -> None:
    with pytest.raises(LoraError, match=r"self_attn\.qkv"):
        pipe.session(prompts=["x"], loras=[lora(files["bad"], 1.0)], **SMALL)


def test_streams_with_different_loras_share_the_dit_correctly(pipe: Pipeline, files: dict[str, Path]) -> None:
    def make(name: str | None, mode: str = "merged") -> StreamSession:
        loras = [lora(files[name], 0.8, mode)] if name else []
        return pipe.session(prompts=["x"], loras=loras, **SMALL)

    modes = {"style": "merged", "other": "runtime", None: "merged"}
    solo = {name: chunks(make(name, mode)) for name, mode in modes.items()}
    a, b, c = (make(name, mode) for name, mode in modes.items())
    interleaved: dict[str | None, list[torch.Tensor]] = {"style": [], "other": [], None: []}
    for thunks in zip(chunks_iter(a), chunks_iter(b), chunks_iter(c)):  # one chunk each, in turn
        for name, run in zip(("style", "other", None), thunks):
            interleaved[name].append(run())
    for name, outs in interleaved.items():
        assert all(torch.equal(x, y) for x, y in zip(outs, solo[name], strict=True)), name


def test_merged_and_runtime_streams_agree(pipe: Pipeline, files: dict[str, Path]) -> None:
    runs = {}
    for mode in ("merged", "runtime"):
        loras = [lora(files["style"], 1.5), lora(files["other"], -0.5)]
        settings = StreamSettings(loras=loras, lora_mode=mode, **SMALL)
        session = StreamSession(pipe.components, settings, prompts=["x"], output="float")
        runs[mode] = torch.cat(chunks(session))
    torch.testing.assert_close(runs["merged"], runs["runtime"], rtol=1e-4, atol=1e-4)
