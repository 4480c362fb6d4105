"""Headless control for scripts: a session from a server-side file or text, JPEG frames, recording, stop."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import av
import httpx
import torch

from server.harness import ServerProcess


def _wait_frame(
    c: httpx.Client, session_id: str, timeout: float = 30.0, epoch: int | None = None
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = c.get(f"/api/v1/sessions/{session_id}/frame.jpg", params={"quality": 80})
        if response.status_code == 200 and (
            epoch is None or int(response.headers["x-wanstream-epoch"]) >= epoch
        ):
            return response
        assert response.status_code in (200, 503), response.text
        assert time.monotonic() < deadline, "no frame arrived"
        time.sleep(0.1)


def _decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data)) as container:
        return list(container.decode(video=0))


def test_file_session_frames_recording_and_stop(server: ServerProcess) -> None:
    with server.client() as c:
        created = c.post(
            "/api/v1/sessions", json={"source": "file", "file": "sample.mp4", "prompts": ["ink drawing"]}
        )
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        frame = _decode(_wait_frame(c, sid).content)[0]
        assert (frame.width, frame.height) == (128, 128)

        started = c.post(f"/api/v1/sessions/{sid}/recording/start", json={"include_input": True})
        assert started.status_code == 201 and started.json()["state"] == "recording"
        assert c.post(f"/api/v1/sessions/{sid}/recording/start").status_code == 409
        assert c.get(f"/api/v1/sessions/{sid}/recording/output.mp4").status_code == 409  # still recording
        time.sleep(2.0)
        ack = c.post(
            f"/api/v1/sessions/{sid}/control", json={"prompts": ["oil painting"], "switch": "cut"}
        ).json()
        assert ack["flushed"] is True
        after_cut = _wait_frame(c, sid, epoch=ack["epoch"])
        assert int(after_cut.headers["x-wanstream-chunk"]) >= ack["next_chunk"]
        time.sleep(1.0)
        stopped = c.post(f"/api/v1/sessions/{sid}/recording/stop").json()
        assert stopped["state"] == "stopped" and stopped["output_frames"] > 0 and stopped["input_frames"] > 0

        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204
        assert c.get(f"/api/v1/sessions/{sid}").status_code == 404
        # The recording outlives its session.
        output = c.get(f"/api/v1/sessions/{sid}/recording/output.mp4")
        source = c.get(f"/api/v1/sessions/{sid}/recording/input.mp4")
        assert output.status_code == 200 and output.headers["content-type"] == "video/mp4"
        out_frames, in_frames = _decode(output.content), _decode(source.content)
        assert len(out_frames) == stopped["output_frames"] and (
            out_frames[0].width,
            out_frames[0].height,
        ) == (128, 128)
        assert len(in_frames) == stopped["input_frames"] and (in_frames[0].width, in_frames[0].height) == (
            320,
            240,
        )
        # Real-time timestamps: about 3 s of stream in each file.
        assert 2.0 < out_frames[-1].time < 6.0 and 2.0 < in_frames[-1].time < 6.0
        assert c.get(f"/api/v1/sessions/{sid}/recording/other.mp4").status_code == 404


def test_text_session_and_a_file_that_ends(server: ServerProcess) -> None:
    with server.client() as c:
        sid = c.post("/api/v1/sessions", json={"source": "text", "prompts": ["a forest at dawn"]}).json()[
            "session_id"
        ]
        _wait_frame(c, sid)
        events = c.get(f"/api/v1/sessions/{sid}/events").json()
        assert events and {e["kind"] for e in events if e["type"] == "chunk"} == {"text"}
        status = c.get(f"/api/v1/sessions/{sid}").json()
        assert status["kind"] == "headless" and status["settings"]["mode"] == "text"
        # Pause: the engine stops making frames; resume: it goes on.
        assert c.post(f"/api/v1/sessions/{sid}/control", json={"paused": True}).json()["applied"] == [
            "paused"
        ]
        made = c.get(f"/api/v1/sessions/{sid}").json()["stats"]["frames_made"]
        time.sleep(1.0)
        paused = c.get(f"/api/v1/sessions/{sid}").json()["stats"]
        assert paused["paused"] and paused["frames_made"] == made
        c.post(f"/api/v1/sessions/{sid}/control", json={"paused": False})
        deadline = time.monotonic() + 20
        while c.get(f"/api/v1/sessions/{sid}").json()["stats"]["frames_made"] == made:
            assert time.monotonic() < deadline, "no frames after resuming"
            time.sleep(0.1)
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204

        bad = c.post("/api/v1/sessions", json={"source": "text", "settings": {"mode": "video"}})
        assert bad.status_code == 422
        assert c.post("/api/v1/sessions", json={"source": "file"}).status_code == 422

        ended_before = _ended(c, "source_ended")
        sid = c.post("/api/v1/sessions", json={"source": "file", "file": "sample.mp4", "loop": False}).json()[
            "session_id"
        ]
        deadline = time.monotonic() + 30  # the clip is 3 s long
        while c.get(f"/api/v1/sessions/{sid}").status_code == 200:
            assert time.monotonic() < deadline, "the session did not end with its file"
            time.sleep(0.2)
        assert _ended(c, "source_ended") == ended_before + 1


def test_status_schema_and_docs(server: ServerProcess, media_dir: Path) -> None:
    with server.client() as c:
        model = c.get("/api/v1/model").json()
        assert model["state"] == "loaded" and "RANDOM WEIGHTS" in model["label"] and model["progress"] == 1.0
        schema = c.get("/api/v1/settings/schema").json()
        assert schema["defaults"]["height"] == 128 and schema["defaults"]["encoder"] == "taehv"
        assert (
            "noise_scale" in schema["schema"]["properties"] and "prompts" in schema["control"]["properties"]
        )
        paths = c.get("/openapi.json").json()["paths"]
        for path in ("/api/v1/webrtc/offer", "/api/v1/sessions/{session_id}/control", "/metrics", "/health"):
            assert path in paths
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        metrics = c.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        for name in (
            "wanstream_model_loaded 1",
            "wanstream_sessions_max 2",
            'wanstream_frames_dropped_total{reason="sampled"}',
            'wanstream_optimisation_fallbacks_total{optimisation="cuda_graph"} 0',  # the demo runs no optimised path
            'wanstream_optimisation_fallbacks_total{optimisation="compile"} 0',
        ):
            assert name in metrics.text
        assert c.get("/api/v1/webrtc/ice-servers").json() == {"iceServers": []}


def _ended(c: httpx.Client, outcome: str) -> float:
    match = re.search(
        rf'^wanstream_sessions_ended_total\{{outcome="{outcome}"\}} (\S+)$', c.get("/metrics").text, re.M
    )
    return float(match.group(1)) if match else 0.0


def test_forgotten_headless_session_is_stopped() -> None:
    """A script that starts a session and goes away does not hold the GPU slot forever."""
    from starlette.testclient import TestClient

    from wanstream.server import ServerConfig, create_app

    threads = torch.get_num_threads()  # the server leaves a core to the media path: restore it after
    idle_s = 2.0
    app = create_app(
        ServerConfig(demo=True, headless_idle_s=idle_s, settings_overrides={"height": 64, "width": 64})
    )
    try:
        with TestClient(app, base_url="http://127.0.0.1:8000") as c:
            app.state.model.wait(60)
            sid = c.post("/api/v1/sessions", json={"source": "text", "prompts": ["a"]}).json()["session_id"]
            for _ in range(3):  # requests about it keep it alive (0.3 s apart: 1.7 s of slack for a slow CPU)
                time.sleep(0.3)
                last_request = time.monotonic()  # the request touches the session after this
                assert c.get(f"/api/v1/sessions/{sid}").status_code == 200
            # Then nobody asks about it: it ends, and never sooner than idle_s after the last request. The
            # session list is watched, which does not count as a request about the session.
            deadline = time.monotonic() + 30
            while any(s["session_id"] == sid for s in c.get("/api/v1/sessions").json()):
                assert time.monotonic() < deadline, "the forgotten session was never stopped"
                time.sleep(0.1)
            assert time.monotonic() - last_request >= idle_s
            assert c.get(f"/api/v1/sessions/{sid}").status_code == 404
            assert _ended(c, "idle") == 1.0
    finally:
        torch.set_num_threads(threads)
