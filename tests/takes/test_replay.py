"""A session's journal, saved to a log file and replayed on fresh networks: the same frames, bit for bit."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from wanstream import Pipeline
from wanstream.engine.components import Components
from wanstream.engine.errors import SessionError
from wanstream.engine.journal import SessionJournal
from wanstream.engine.prompts import Transition, WeightedPrompt
from wanstream.engine.random_weights import randomize_
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.engine.vace import VaceConditioner
from wanstream.models.vace import VaceModule
from wanstream.takes import LogError, load_log, replay, save_log
from wanstream.takes.frames import decode_blob, encode_blob

H, W = 32, 48


def frames_u8(t: int, seed: int, size: tuple[int, int] = (H, W)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(t, *size, 3, generator=gen) * 255).to(torch.uint8)


def live_take(session: StreamSession) -> dict[int, np.ndarray]:
    """Drive a session through every kind of live change; returns its output frames by index (each also
    noted in the journal, as the server's worker does with the frames it sends)."""
    out: dict[int, np.ndarray] = {}

    def keep(frames: torch.Tensor, send: bool = True) -> None:
        first = session.frames_out - frames.shape[0]
        for j, image in enumerate(frames.numpy()):
            out[first + j] = image
            if send:
                session.log().note_output(first + j, image)

    keep(session.push(frames_u8(9, 1, (40, 60))))  # another size than the stream's: resized by the engine
    session.set_prompts(
        [WeightedPrompt(text="a fox", weight=2.0), "snow"], transition=Transition(steps=3, method="slerp")
    )
    keep(session.push(list(frames_u8(6, 2))))  # a list of frames
    keep(session.update({"seed": 7, "noise_scale": 0.6}))
    keep(session.push(frames_u8(5, 3).numpy()))
    keep(session.update({"steps": (800, 600, 400)}))  # a restart: chunks in flight drain out
    keep(session.push(frames_u8(8, 4)))
    keep(session.update({"steps": (700,)}))
    keep(session.push(frames_u8(4, 5)))
    keep(session.reset(), send=False)  # a cut: what it returns is not sent
    keep(session.push(frames_u8(7, 6)))
    keep(session.set_prompts("oil painting", switch="cut"), send=False)
    keep(session.push(frames_u8(6, 7).float() / 255))  # float frames
    with pytest.raises(ValidationError):
        session.update({"steps": ()})  # rejected: not recorded
    keep(session.flush())
    return out


def test_a_take_replays_bit_for_bit_from_its_log_file(tmp_path: Path) -> None:
    live_pipe = Pipeline.demo()
    session = live_pipe.session(height=H, width=W, prompts=["a watercolor city"], log=True)
    live = live_take(session)
    journal = session.log()
    assert [op.name for op in journal.ops].count("update") == 3  # the rejected one is not there
    path = save_log(journal, tmp_path / "take.wslog", live_pipe.components)

    got: dict[int, np.ndarray] = {}
    fresh = Pipeline.demo()  # new networks from the same seed: nothing is shared with the live run
    with load_log(path) as log:
        report = replay(log, fresh.components, on_frames=lambda i, f: got.update(enumerate(f, i)))
    assert report.differences == [] and report.count_mismatches == []
    assert report.bit_exact and report.compared == len(journal.digests) > 20
    assert sorted(got) == sorted(live)
    for i, image in live.items():
        assert np.array_equal(got[i], image), f"output frame {i} differs"


def test_a_replay_on_other_weights_runs_and_says_why_frames_differ(tmp_path: Path) -> None:
    live_pipe = Pipeline.demo()
    session = live_pipe.session(height=H, width=W, prompts=["a watercolor city"], log=True)
    out = session.push(frames_u8(13, 1))
    for i, image in enumerate(out.numpy()):
        session.log().note_output(i, image)
    path = save_log(session.log(), tmp_path / "take.wslog", live_pipe.components)
    with load_log(path) as log:
        report = replay(log, Pipeline.demo(seed=3).components)
    assert report.compared == out.shape[0] and report.identical == 0 and not report.bit_exact
    assert report.first_mismatch == 0
    assert any("weights_seed" in d for d in report.differences)
    assert "differs from the take's" in report.summary()


def test_a_take_can_start_later_than_its_log(tmp_path: Path) -> None:
    pipe = Pipeline.demo()
    session = pipe.session(height=H, width=W, prompts=["ink"], log=True)
    live = session.push(frames_u8(17, 1))
    path = save_log(session.log(), tmp_path / "take.wslog", pipe.components, first_output=9)
    got: dict[int, np.ndarray] = {}
    with load_log(path) as log:
        replay(log, pipe.components, on_frames=lambda i, f: got.update(enumerate(f, i)))
    assert sorted(got) == list(range(9, live.shape[0]))
    assert all(np.array_equal(got[i], live[i].numpy()) for i in got)


@pytest.fixture(scope="module")
def vace_components() -> Components:
    components = Pipeline.demo().components
    vace = randomize_(VaceModule(components.dit.config), seed=7).eval().requires_grad_(False)
    return dataclasses.replace(components, vace=vace)


def test_a_vace_take_replays_bit_for_bit(vace_components: Components, tmp_path: Path) -> None:
    settings = StreamSettings(height=H, width=W, mode="text", batching="none", steps=(1000, 750))
    session = StreamSession(vace_components, settings, prompts=["a cat"], log=True)
    cond = VaceConditioner(session, scale=0.8)
    session.attach(cond)
    outputs = [cond.push(frames_u8(5, 1))]
    cond.set_reference_images([frames_u8(1, 2)[0].numpy()])
    cond.set_scale(1.5)
    outputs.append(cond.push(frames_u8(4, 3)))
    cond.set_first_frame(frames_u8(1, 4)[0], persist=False)
    outputs.append(cond.push(frames_u8(4, 5), masks=torch.ones(4, H, W)))
    outputs.append(cond.flush())
    live = torch.cat(outputs)
    assert live.shape[0] == 13
    path = save_log(session.log(), tmp_path / "vace.wslog", vace_components)
    got: list[np.ndarray] = []
    with load_log(path) as log:
        report = replay(log, vace_components, on_frames=lambda i, f: got.extend(f))
    assert report.count_mismatches == []
    assert np.array_equal(np.stack(got), live.numpy())


def test_what_a_journal_cannot_replay_is_said_not_faked(tmp_path: Path) -> None:
    pipe = Pipeline.demo()
    session = pipe.session(height=H, width=W, prompts=["ink"], log=True)
    session.push(frames_u8(5, 1))
    session.restore(session.snapshot())
    path = save_log(session.log(), tmp_path / "take.wslog", pipe.components)
    with load_log(path) as log, pytest.raises(LogError, match="restored from a snapshot"):
        replay(log, pipe.components)
    with pytest.raises(SessionError, match="log=True"):
        pipe.session(height=H, width=W).log()


def test_a_journal_over_its_size_limit_stops_and_says_where(tmp_path: Path) -> None:
    pipe = Pipeline.demo()
    settings = StreamSettings(height=H, width=W)
    journal = SessionJournal(settings=settings.model_dump(mode="json"), output="uint8", limit_bytes=20_000)
    session = StreamSession(pipe.components, settings, prompts=["ink"], log=journal)
    for seed in range(6):
        session.push(frames_u8(4, seed))
    assert journal.truncated is not None and "size limit" in journal.truncated
    kept = len(journal.ops)
    assert 1 < kept < 7
    path = save_log(journal, tmp_path / "take.wslog", pipe.components)
    with load_log(path) as log:
        report = replay(log, pipe.components)
    assert report.truncated == journal.truncated and "truncated" in report.summary()


def test_bad_log_files_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LogError, match="not a session log"):
        load_log(tmp_path / "notes.txt")
    with pytest.raises(LogError, match="no such file"):
        load_log(tmp_path / "missing.wslog")
    pipe = Pipeline.demo()
    session = pipe.session(height=H, width=W, prompts=["ink"], log=True)
    session.push(frames_u8(5, 1))
    good = save_log(session.log(), tmp_path / "take.wslog", pipe.components)
    with zipfile.ZipFile(good) as z:
        header = json.loads(z.read("log.json"))
        blobs = {name: z.read(name) for name in z.namelist() if name != "log.json"}
    for name, edit, match in [
        ("future.wslog", lambda h: h.update(version=99), "version 99"),
        ("other.wslog", lambda h: h.update(format="something"), "not a session log"),
        (
            "call-mode.wslog",
            lambda h: h["ops"][0].update(grad_mode="sideways"),
            "grad_mode 'sideways' is not one",
        ),
        ("session-mode.wslog", lambda h: h["session"].update(grad_mode="sideways"), "grad_mode 'sideways'"),
    ]:
        changed = json.loads(json.dumps(header))
        edit(changed)
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("log.json", json.dumps(changed))
        with pytest.raises(LogError, match=match):
            load_log(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "frameless.wslog", "w") as z:
        z.writestr("log.json", json.dumps(header))
    with pytest.raises(LogError, match=r"frames .* missing"):
        load_log(tmp_path / "frameless.wslog")

    # A log written before the autograd modes were noted: its calls ran in inference mode (the server's).
    del header["session"]["grad_mode"]
    for op in header["ops"]:
        del op["grad_mode"]
    with zipfile.ZipFile(tmp_path / "older.wslog", "w") as z:
        z.writestr("log.json", json.dumps(header))
        for blob, data in blobs.items():
            z.writestr(blob, data)
    with load_log(tmp_path / "older.wslog") as log:
        assert log.grad_mode == "inference" and {op.grad_mode for op in log.ops} == {"inference"}


@pytest.mark.parametrize("shape", [(4, 33, 47, 3), (1, 16, 16, 3)])
def test_frames_are_stored_losslessly(shape: tuple[int, ...]) -> None:
    rgb = frames_u8(shape[0], 5, shape[1:3])
    assert torch.equal(decode_blob("000001.mkv", encode_blob(rgb)), rgb)
    other = torch.randn(2, 8, 8, 1)
    assert torch.equal(decode_blob("000002.npy", encode_blob(other)), other)


def test_a_take_exports_as_a_scope_timeline(tmp_path: Path) -> None:
    from wanstream.takes.timeline import timeline_of
    from wanstream.timeline import load_timeline

    pipe = Pipeline.demo()
    session = pipe.session(height=H, width=W, prompts=["a watercolor city"], log=True)
    live_take(session)
    path = save_log(session.log(), tmp_path / "take.wslog", pipe.components)
    with load_log(path) as log:
        timeline = timeline_of(log)
    timeline.save(tmp_path / "show.json")
    back = load_timeline(tmp_path / "show.json")  # Scope's format, read back by our own reader
    texts = [[p.text for p in s.prompts] for s in back.segments]
    assert texts == [["a watercolor city"], ["a fox", "snow"], ["oil painting"]]
    assert back.segments[1].transition_steps == 3 and back.segments[1].interpolation == "slerp"
    assert back.segments[2].transition_steps is None  # a plain switch (the take cut)
    assert back.settings.seed == 42 and back.settings.height == H
    assert all(a.end == b.start for a, b in zip(back.segments, back.segments[1:], strict=False))


def test_each_call_replays_in_the_autograd_mode_it_ran_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled code is specialised on the autograd mode (and on whether its inputs are inference tensors), and
    the specialisations may round differently (seen on an H100): a take made outside inference mode — a script
    on the Python API, a benchmark — replays each call, and makes its session, in the mode the live one had."""
    from wanstream.engine.journal import current_grad_mode

    live_pipe = Pipeline.demo()
    assert current_grad_mode() == "grad"  # pytest's thread: autograd on
    session = live_pipe.session(height=H, width=W, prompts=["a watercolor city"], log=True)
    with torch.no_grad():
        first = session.push(frames_u8(5, 1))
    second = session.push(frames_u8(4, 2))
    with torch.inference_mode():
        third = session.push(frames_u8(4, 3))
    live = torch.cat([first, second, third]).numpy()
    for i, image in enumerate(live):
        session.log().note_output(i, image)
    path = save_log(session.log(), tmp_path / "take.wslog", live_pipe.components)

    # Each replayed push: its mode, and whether its session's KV cache (made with the session) is an inference
    # tensor.
    ran: list[tuple[str, bool]] = []
    push = StreamSession.push

    def spy(self: StreamSession, frames):
        ran.append((current_grad_mode(), self.denoiser.cache.k.is_inference()))
        return push(self, frames)

    monkeypatch.setattr(StreamSession, "push", spy)
    with load_log(path) as log:
        assert log.grad_mode == "grad"
        assert [op.grad_mode for op in log.ops if op.name == "push"] == ["no_grad", "grad", "inference"]
        report = replay(log, Pipeline.demo().components)
    assert [mode for mode, _ in ran] == ["no_grad", "grad", "inference"]
    assert not ran[0][1]  # the session was made outside inference mode, as the live one
    assert report.bit_exact and report.identical == len(live) > 0

    # Made inside inference mode (as the server's engine thread makes its sessions), the replay's is too.
    with torch.inference_mode():
        inside = live_pipe.session(height=H, width=W, prompts=["a watercolor city"], log=True)
        inside.push(frames_u8(5, 1))
    path = save_log(inside.log(), tmp_path / "inside.wslog", live_pipe.components)
    ran.clear()
    with load_log(path) as log:
        assert log.grad_mode == "inference" and log.ops[-1].grad_mode == "inference"
        replay(log, Pipeline.demo().components)
    assert ran == [("inference", True)]
