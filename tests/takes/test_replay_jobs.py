"""Replays on the server (`POST /api/v1/sessions/{id}/replay`, `GET /api/v1/replays/{job}`): a finished
session's take replays bit for bit on the server's own networks, and its replay.mp4 is the recording's
output.mp4 byte for byte; a replay takes a stream slot (409 when none is free, and a stream is refused
while it runs); unknown ids are 404, bad bodies 422, and a cancelled replay frees its slot and its files.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import av
import httpx
import pytest
import torch

from wanstream.media.sample import write_sample_clip

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, httpx.Client]]:
    from starlette.testclient import TestClient

    from wanstream.server import ServerConfig, create_app

    media = tmp_path_factory.mktemp("replay-media")
    write_sample_clip(media / "sample.mp4", num_frames=40, height=96, width=128)
    threads = torch.get_num_threads()  # the server leaves a core to the media path: restore it after
    config = ServerConfig(
        demo=True, media_dir=media, max_sessions=1, settings_overrides={"height": 48, "width": 64}
    )
    app = create_app(config)
    try:
        with TestClient(app, base_url="http://127.0.0.1:8000") as c:
            assert app.state.model.wait(60).state == "loaded"
            yield app, c
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(app_client: tuple[Any, httpx.Client]) -> httpx.Client:
    return app_client[1]


def wait_for(predicate: Any, what: str, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def chunks_made(c: httpx.Client, sid: str) -> int:
    rows = [e for e in c.get(f"/api/v1/sessions/{sid}/events").json() if e["type"] == "chunk"]
    return max((e["chunk"] for e in rows), default=-1) + 1


def start_session(c: httpx.Client, body: dict[str, Any]) -> str:
    created = c.post("/api/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    wait_for(lambda: chunks_made(c, sid) >= 2, "the stream's first chunks")
    return sid


def end_session(c: httpx.Client, sid: str) -> None:
    assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204


@pytest.fixture(scope="module")
def recorded(client: httpx.Client) -> tuple[str, dict[str, Any]]:
    """A finished session that streamed a file, recorded part of it with live changes (a transition, a
    reset), and went on a little after."""
    sid = start_session(client, {"source": "file", "file": "sample.mp4", "loop": True, "prompts": ["ink"]})
    try:
        assert client.post(f"/api/v1/sessions/{sid}/recording/start").status_code == 201
        base = f"/api/v1/sessions/{sid}/recording"
        for count, change in (
            (4, {"prompts": ["oil painting"], "transition": {"steps": 2}}),
            (8, {"reset": True}),
            (12, {"seed": 5}),
        ):
            wait_for(
                lambda n=count: client.get(base).json()["output_frames"] >= n, f"{count} recorded frames"
            )
            ack = client.post(f"/api/v1/sessions/{sid}/control", json=change)
            assert ack.status_code == 200, ack.text
        wait_for(lambda: client.get(base).json()["output_frames"] >= 20, "20 recorded frames")
        info = client.post(f"{base}/stop").json()
        after = chunks_made(client, sid)
        wait_for(lambda: chunks_made(client, sid) >= after + 2, "chunks after the recording")
    finally:
        end_session(client, sid)
    return sid, info


def run_replay(c: httpx.Client, sid: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    started = c.post(f"/api/v1/sessions/{sid}/replay", json=body)
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["state"] in ("queued", "running") and job["session_id"] == sid
    url = f"/api/v1/replays/{job['job']}"
    return wait_for(
        lambda: (v := c.get(url).json())["state"] not in ("queued", "running") and v, "the replay to end"
    )


def decoded_frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_a_recorded_take_replays_bit_for_bit_into_the_same_mp4(
    client: httpx.Client, recorded: tuple[str, dict[str, Any]]
) -> None:
    sid, info = recorded
    job = run_replay(client, sid)  # a stopped recording: its take by default
    assert job["state"] == "done", job
    assert job["take"] == "recording" and job["first_output"] > 0, job  # recorded from a later frame
    report = job["report"]
    assert report["bit_exact"] and report["compared"] > 0, report
    assert report["identical"] == report["compared"] and report["differences"] == [], report
    assert "identical bit for bit" in report["summary"]
    assert job["progress"]["done"] == job["progress"]["total"] > 0

    # The recording's frames, encoded as the recording was: the same file, byte for byte.
    assert job["frames_written"] == info["output_frames"] + info["dropped_frames"]
    video = client.get(job["replay_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert decoded_frames(video.content) == job["frames_written"]
    live = client.get(job["live_url"])
    assert live.status_code == 200
    if info["dropped_frames"] == 0:
        assert video.content == live.content, "a bit-exact replay encodes to the recording's own bytes"
    assert client.get("/health").json()["replays"] == 0  # the slot is back


def test_the_whole_stream_replays_from_its_first_frame(
    client: httpx.Client, recorded: tuple[str, dict[str, Any]]
) -> None:
    sid, _ = recorded
    job = run_replay(client, sid, {"take": "stream"})
    assert job["state"] == "done" and job["take"] == "stream" and job["live_url"] is None, job
    report = job["report"]
    assert report["bit_exact"] and report["compared"] > 0, report
    # Every frame the stream sent (all it made here), from its first.
    assert job["first_output"] == 0 and job["frames_written"] == report["compared"] == report["frames"]
    video = client.get(job["replay_url"])
    assert decoded_frames(video.content) == report["frames"]


def test_a_replay_takes_a_stream_slot(client: httpx.Client, recorded: tuple[str, dict[str, Any]]) -> None:
    sid, _ = recorded
    live = start_session(client, {"source": "text", "prompts": ["ink"]})  # max_sessions=1: the only slot
    try:
        busy = client.post(f"/api/v1/sessions/{sid}/replay")
        assert busy.status_code == 409 and "busy" in busy.json()["detail"], busy.text
    finally:
        end_session(client, live)

    started = client.post(f"/api/v1/sessions/{sid}/replay", json={"take": "stream"})
    assert started.status_code == 202, started.text
    job = started.json()["job"]
    refused = client.post("/api/v1/sessions", json={"source": "text", "prompts": ["ink"]})
    assert refused.status_code == 409 and "take replaying" in refused.json()["detail"], refused.text
    wait_for(lambda: client.get(f"/api/v1/replays/{job}").json()["state"] == "done", "the replay")
    end_session(client, start_session(client, {"source": "text", "prompts": ["ink"]}))  # free again


def test_a_cancelled_replay_is_gone_and_frees_its_slot(
    app_client: tuple[Any, httpx.Client], recorded: tuple[str, dict[str, Any]]
) -> None:
    app, client = app_client
    sid, _ = recorded
    started = client.post(f"/api/v1/sessions/{sid}/replay", json={"take": "stream"})
    assert started.status_code == 202, started.text
    job = started.json()["job"]
    folder = app.state.replays.root / job
    assert client.delete(f"/api/v1/replays/{job}").status_code == 204
    assert client.get(f"/api/v1/replays/{job}").status_code == 404
    assert client.get(f"/api/v1/replays/{job}/replay.mp4").status_code == 404
    assert client.delete(f"/api/v1/replays/{job}").status_code == 404
    wait_for(lambda: client.get("/health").json()["replays"] == 0, "the slot to be given back", 30)
    wait_for(lambda: not folder.exists(), "the job's files to go", 10)


def test_bad_requests_change_nothing(client: httpx.Client, recorded: tuple[str, dict[str, Any]]) -> None:
    sid, _ = recorded
    url = f"/api/v1/sessions/{sid}/replay"
    for body in ({"take": "other"}, {"take": "stream", "extra": 1}, [1]):
        bad = client.post(url, json=body)
        assert bad.status_code == 422, (body, bad.text)
    bad = client.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    huge = client.post(url, content=b" " * (65 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413

    missing = client.post("/api/v1/sessions/nope/replay")
    assert missing.status_code == 404 and "no session log" in missing.text
    for method, path in (("GET", "/api/v1/replays/nope"), ("GET", "/api/v1/replays/nope/replay.mp4")):
        assert client.request(method, path).status_code == 404
    assert client.delete("/api/v1/replays/nope").status_code == 404

    text = start_session(client, {"source": "text", "prompts": ["ink"]})  # a take with no recording
    end_session(client, text)
    refused = client.post(f"/api/v1/sessions/{text}/replay", json={"take": "recording"})
    assert refused.status_code == 409 and "record first" in refused.text
    assert client.get("/health").json()["replays"] == 0  # nothing was started


def test_a_failed_replay_says_why_and_frees_its_slot(
    client: httpx.Client, recorded: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from wanstream.server import replays

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(replays, "replay", broken)
    sid, _ = recorded
    job = run_replay(client, sid)
    assert job["state"] == "failed" and job["error"] == "RuntimeError: the device fell over", job
    assert job["report"] is None and job["replay_url"] is None
    assert client.get(f"/api/v1/replays/{job['job']}/replay.mp4").status_code == 409
    assert client.get("/health").json()["replays"] == 0
    assert client.get("/health").json()["status"] == "ok"


def test_only_the_last_finished_replays_are_kept(
    app_client: tuple[Any, httpx.Client],
    recorded: tuple[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, client = app_client
    monkeypatch.setattr(app.state.replays, "keep", 2)
    sid, _ = recorded
    jobs = [run_replay(client, sid)["job"] for _ in range(3)]
    assert client.get(f"/api/v1/replays/{jobs[0]}").status_code == 404
    assert not (app.state.replays.root / jobs[0]).exists()  # its files went with it
    for job in jobs[1:]:
        assert client.get(f"/api/v1/replays/{job}/replay.mp4").status_code == 200
