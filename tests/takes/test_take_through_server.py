"""A live take through the server, with changes at random moments, replays offline bit for bit.

The server (in this process, over its HTTP API) streams a looping file on the demo model while a client
changes prompts (with transitions), seed, steps 2 → 3 → 1, noise, a LoRA's scale and resets at random
moments; the session log downloaded afterwards is replayed on freshly built networks, and every frame the
live stream sent must come out identical.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from wanstream import Pipeline
from wanstream.engine.random_weights import demo_components
from wanstream.media.sample import write_sample_clip
from wanstream.models.lora import linear_targets
from wanstream.takes import load_log, replay
from wanstream.weights.lora import LoraFiles

from support.lora_files import lora_state_dict, random_pairs, write_lora


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    media = tmp_path_factory.mktemp("take-media")
    write_sample_clip(media / "sample.mp4", num_frames=40, height=96, width=128)
    loras = tmp_path_factory.mktemp("take-loras")
    shapes = linear_targets(demo_components().dit)
    blocks = [name for name in shapes if name.startswith("blocks.")]
    write_lora(loras / "style.safetensors", lora_state_dict(random_pairs(shapes, blocks), "kohya"))
    return media, loras


@pytest.fixture(scope="module")
def client(folders: tuple[Path, Path]) -> Iterator[httpx.Client]:
    from starlette.testclient import TestClient

    from wanstream.server import ServerConfig, create_app

    media, loras = folders
    threads = torch.get_num_threads()  # the server leaves a core to the media path: restore it after
    config = ServerConfig(
        demo=True, media_dir=media, lora_dir=loras, settings_overrides={"height": 48, "width": 64}
    )
    app = create_app(config)
    try:
        with TestClient(app, base_url="http://127.0.0.1:8000") as c:
            assert app.state.model.wait(60).state == "loaded"
            yield c
    finally:
        torch.set_num_threads(threads)


def chunks_made(c: httpx.Client, sid: str) -> int:
    rows = [e for e in c.get(f"/api/v1/sessions/{sid}/events").json() if e["type"] == "chunk"]
    return max((e["chunk"] for e in rows), default=-1) + 1


def test_a_live_take_replays_bit_for_bit(
    client: httpx.Client, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    rng = random.Random(2024)
    body = {
        "source": "file",
        "file": "sample.mp4",
        "prompts": ["a watercolor harbour"],
        "settings": {"loras": [{"path": "style.safetensors", "scale": 0.5}]},
    }
    created = client.post("/api/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    changes = [
        {"prompts": [{"text": "a fox", "weight": 2.0}, {"text": "snow"}], "transition": {"steps": 3}},
        {"seed": 11},
        {"steps": [800, 600, 400]},
        {"noise_scale": 0.55},
        {"loras": [{"path": "style.safetensors", "scale": 0.9}]},
        {"prompts": ["oil painting"], "transition": {"steps": 2, "method": "slerp"}},
        {"steps": [700]},
        {"paused": True},
        {"paused": False},
        {"reset": True},
        {"prompts": ["ink drawing"], "switch": "cut"},
    ]
    try:
        deadline = time.monotonic() + 120
        while chunks_made(client, sid) < 2:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.05)
        for change in changes:
            time.sleep(rng.uniform(0.0, 0.6))  # a random moment: mid-chunk or between chunks
            ack = client.post(f"/api/v1/sessions/{sid}/control", json=change)
            assert ack.status_code == 200, ack.text
            if change.get("paused"):
                continue  # no chunk runs while paused: the resume's wait covers it
            target = ack.json()["next_chunk"] + 1
            while chunks_made(client, sid) < target:  # the change has taken effect and run a chunk
                assert time.monotonic() < deadline, f"no chunk after {change}"
                time.sleep(0.05)
        settings = client.get(f"/api/v1/sessions/{sid}").json()["settings"]
        assert settings["steps"] == [700] and settings["seed"] == 11, settings
    finally:
        assert client.delete(f"/api/v1/sessions/{sid}").status_code == 204

    response = client.get(f"/api/v1/sessions/{sid}/log")  # kept after the session ended
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == f'attachment; filename="wanstream-{sid}.wslog"'
    folder = client.app.state.sessions.take_for(sid).folder  # type: ignore[attr-defined]
    assert sorted(p.name for p in folder.iterdir()) == ["frames"]  # sent as written: no copy on disk
    path = tmp_path / "take.wslog"
    path.write_bytes(response.content)

    fresh = Pipeline.demo()  # networks built again: nothing shared with the live stream's
    fresh.components.lora_source = LoraFiles(folders[1], confine=True)
    with load_log(path) as log:
        names = [(op.target, op.name) for op in log.ops]
        assert ("session", "update") in names and ("session", "reset") in names
        assert ("marker", "pause") in names and ("marker", "resume") in names
        assert log.header["truncated"] is None and log.header["unreplayable"] is None
        report = replay(log, fresh.components)
    assert report.differences == [], report.differences
    assert report.count_mismatches == []
    assert report.compared >= 9 * 4 and report.identical == report.compared, report.summary()
    assert report.bit_exact


def test_logs_are_asked_for_clearly(client: httpx.Client) -> None:
    missing = client.get("/api/v1/sessions/nope/log")
    assert missing.status_code == 404 and "no session log" in missing.text
    created = client.post("/api/v1/sessions", json={"source": "text", "prompts": ["ink"]})
    sid = created.json()["session_id"]
    try:
        refused = client.get(f"/api/v1/sessions/{sid}/log", params={"take": "recording"})
        assert refused.status_code == 409 and "record first" in refused.text
        assert client.get(f"/api/v1/sessions/{sid}/log", params={"take": "other"}).status_code == 422
    finally:
        assert client.delete(f"/api/v1/sessions/{sid}").status_code == 204


def test_ended_streams_logs_are_kept_few_and_their_frames_deleted(client: httpx.Client) -> None:
    from wanstream.server.sessions import KEPT_TAKES

    manager = client.app.state.sessions  # type: ignore[attr-defined]
    ended = []
    for _ in range(KEPT_TAKES + 1):
        sid = client.post("/api/v1/sessions", json={"source": "text", "prompts": ["ink"]}).json()[
            "session_id"
        ]
        deadline = time.monotonic() + 60
        while chunks_made(client, sid) < 1:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.05)
        folder = manager.take_for(sid).folder
        assert client.delete(f"/api/v1/sessions/{sid}").status_code == 204
        ended.append((sid, folder))
    oldest, folder = ended[0]
    assert not folder.exists()  # evicted: its frames are gone from the disk
    assert client.get(f"/api/v1/sessions/{oldest}/log").status_code == 404
    newest, folder = ended[-1]
    assert folder.exists() and client.get(f"/api/v1/sessions/{newest}/log").status_code == 200
