"""`wanstream replay`: a saved take into an MP4, with the report; bad logs get exit code 2 and a reason."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import torch

from wanstream import Pipeline
from wanstream.cli.main import main
from wanstream.takes import save_log

H, W = 32, 48


def saved_take(tmp_path: Path, *, restore: bool = False) -> tuple[Path, int]:
    pipe = Pipeline.demo()
    session = pipe.session(height=H, width=W, prompts=["ink"], log=True)
    gen = torch.Generator().manual_seed(0)
    out = session.push((torch.rand(13, H, W, 3, generator=gen) * 255).to(torch.uint8))
    out = torch.cat([out, session.update({"seed": 5}), session.flush()])
    for i, image in enumerate(out.numpy()):
        session.log().note_output(i, image)
    if restore:
        session.restore(session.snapshot())
    return save_log(session.log(), tmp_path / "take.wslog", pipe.components), out.shape[0]


def test_replay_writes_the_take_and_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, frames = saved_take(tmp_path)
    rc = main(["replay", str(log), "-o", str(tmp_path / "out.mp4"), "--json", str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bit_exact"] and report["compared"] == frames == report["identical"]
    with av.open(str(tmp_path / "out.mp4")) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == frames and (decoded[0].height, decoded[0].width) == (H, W)
    assert f"{frames} of {frames} frames" in capsys.readouterr().err


def test_replay_refuses_what_it_cannot_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "missing.wslog")]) == 2
    assert "no such file" in capsys.readouterr().err
    log, _ = saved_take(tmp_path, restore=True)
    assert main(["replay", str(log), "-o", str(tmp_path / "out.mp4")]) == 2
    assert "restored from a snapshot" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_a_take_on_random_networks_without_a_text_encoder_replays(tmp_path: Path) -> None:
    """The GPU tools' takes: random networks (here the tiny ones) and prompts set as embeddings, no text
    encoder. The log says so (`tiny`, text placement "none"), and the replay builds the same networks."""
    from wanstream.engine.random_weights import random_components
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings

    c = random_components(torch.device("cpu"), torch.float32, tiny=True)
    c.random_weights = True
    session = StreamSession(c, StreamSettings(height=H, width=W), log=True)
    gen = torch.Generator().manual_seed(0)
    session.set_prompt_embeddings(torch.randn(1, c.dit.config.text_len, c.dit.config.text_dim, generator=gen))
    out = session.push((torch.rand(9, H, W, 3, generator=gen) * 255).to(torch.uint8))
    for i, image in enumerate(out.numpy()):
        session.log().note_output(i, image)
    log = save_log(session.log(), tmp_path / "take.wslog", c)
    report = tmp_path / "report.json"
    assert main(["replay", str(log), "-o", str(tmp_path / "out.mp4"), "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["bit_exact"] and got["compared"] == out.shape[0] == got["identical"] > 0
