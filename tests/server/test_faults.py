"""Load and fault tests on loopback. A healthy stream runs throughout: every fault gets a clear error, the
healthy stream keeps streaming, and nothing leaks."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.harness import ServerProcess, describe, leaks, resources, settled_resources, wait_sessions
from server.rtc_client import BackgroundClient, RtcClient, SyntheticCamera

PROMPT = "a stained glass window of a forest"


@pytest.fixture(scope="module")
def healthy(demo_server: ServerProcess) -> Iterator[BackgroundClient]:
    client = BackgroundClient(demo_server.url, demo_server.headers, prompts=[PROMPT])
    yield client
    client.stop()
    with demo_server.client() as c:
        deadline = time.monotonic() + 20
        while c.get("/api/v1/sessions").json():
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.fixture
def baseline(demo_server: ServerProcess, healthy: BackgroundClient) -> Iterator[dict]:
    """Resources with only the healthy stream running; after the test they must be back here."""
    with demo_server.client() as c:
        before = resources(c)
    yield before
    assert healthy.still_streaming(), "the healthy stream stopped"
    with demo_server.client() as c:
        after = settled_resources(c, before)
        assert [s["session_id"] for s in c.get("/api/v1/sessions").json()] == [healthy.session_id]
    assert leaks(before, after) == [], (before, after)


def _metric(text: str, name: str, **labels: str) -> float:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + label + '}') if label else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_connect_disconnect_cycles(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """20 connect → first frame → disconnect cycles beside the healthy stream."""

    async def cycles() -> list[tuple[float, float]]:
        timings = []
        async with demo_server.async_client() as http:
            for _ in range(20):
                start = time.monotonic()
                client = RtcClient(http, camera=SyntheticCamera(fps=30, height=120, width=160))
                await client.connect(prompts=[PROMPT])
                await client.wait_frames(1)
                first_frame = time.monotonic() - start
                await client.close()
                await wait_sessions(http, 1)  # only the healthy one is left
                timings.append((first_frame, time.monotonic() - start))
        return timings

    timings = asyncio.run(cycles())
    firsts, totals = [t[0] for t in timings], [t[1] for t in timings]
    with demo_server.client() as c:
        text = c.get("/metrics").text
        after = settled_resources(c, baseline)
    print(
        f"\n20 cycles: first frame median {statistics.median(firsts):.2f}s max {max(firsts):.2f}s; "
        f"cycle median {statistics.median(totals):.2f}s max {max(totals):.2f}s\n"
        f"  before {describe(baseline)}\n  after  {describe(after)}"
    )
    assert _metric(text, "wanstream_sessions_ended_total", outcome="client") >= 20


def test_second_client_while_busy(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """--max-sessions 2: with two streams running, a third gets 409 and a reason; both keep streaming."""

    async def run() -> None:
        async with demo_server.async_client() as http:
            second = RtcClient(http, camera=SyntheticCamera(fps=15, height=120, width=160))
            await second.connect(prompts=[PROMPT])
            rejected_before = _metric(
                (await http.get("/metrics")).text, "wanstream_sessions_rejected_total", reason="busy"
            )
            third = RtcClient(http, camera=SyntheticCamera(fps=15))
            response = await third.offer(prompts=[PROMPT])
            assert response.status_code == 409
            assert "busy" in response.json()["detail"] and "--max-sessions 2" in response.json()["detail"]
            headless = await http.post("/api/v1/sessions", json={"source": "text", "prompts": [PROMPT]})
            assert headless.status_code == 409
            text = (await http.get("/metrics")).text
            assert _metric(text, "wanstream_sessions_rejected_total", reason="busy") == rejected_before + 2
            count = len(second.frames)
            await second.wait_frames(count + 4)
            await third.close()
            await second.close()
            await wait_sessions(http, 1)

    asyncio.run(run())


def test_client_that_never_completes_ice(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """An offer whose client never connects is torn down after --ice-timeout (3 s here)."""

    async def run() -> None:
        async with demo_server.async_client() as http:
            ghost = RtcClient(http, camera=SyntheticCamera(fps=15))
            response = await ghost.offer(prompts=[PROMPT])  # the answer is never applied: no ICE
            offered = time.monotonic()
            assert response.status_code == 200
            ghost_id = response.json()["session_id"]
            ended_before = _metric(
                (await http.get("/metrics")).text, "wanstream_sessions_ended_total", outcome="ice_timeout"
            )
            sessions = {s["session_id"] for s in (await http.get("/api/v1/sessions")).json()}
            assert ghost_id in sessions
            await wait_sessions(http, 1, timeout=15)
            took = time.monotonic() - offered
            print(f"\nICE never completed: torn down {took:.2f}s after the answer (--ice-timeout 3)")
            assert took > 2.5
            text = (await http.get("/metrics")).text
            assert _metric(text, "wanstream_sessions_ended_total", outcome="ice_timeout") == ended_before + 1
            assert (await http.get(f"/api/v1/sessions/{ghost_id}")).status_code == 404
            await ghost.close()

    asyncio.run(run())


def test_malformed_offers(demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict) -> None:
    with demo_server.client() as c:
        cases = [
            ("hello", "not an SDP"),
            ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "no video"),
            ("v=0\r\nm=video nonsense\r\na=sendrecv\r\n", "could not be parsed"),
        ]
        for sdp, reason in cases:
            response = c.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
            assert response.status_code == 400, response.text
            assert reason in response.json()["detail"], response.text
        assert c.post("/api/v1/webrtc/offer", json={"sdp": "", "type": "offer"}).status_code == 422
        assert c.post("/api/v1/webrtc/offer", json={"sdp": "v=0", "type": "answer"}).status_code == 422
        assert (
            c.post(
                "/api/v1/webrtc/offer", content=b"{not json", headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
        response = c.post(
            "/api/v1/webrtc/offer",
            json={"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "settings": {"height": 100}},
        )
        assert response.status_code == 422 and "multiple of 16" in response.text
        # Trickle ICE: unknown session, bad candidate.
        body = {"candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}]}
        assert c.patch("/api/v1/webrtc/offer/nope", json=body).status_code == 404
        bad = {"candidates": [{"candidate": "candidate:garbage", "sdpMid": "0"}]}
        response = c.patch(f"/api/v1/webrtc/offer/{healthy.session_id}", json=bad)
        assert response.status_code == 400 and "bad ICE candidate" in response.json()["detail"]


def test_bad_parameters_over_rest_and_websocket(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """Malformed and out-of-range updates on the healthy session: rejected with the reason, nothing changes."""
    import websockets

    url = f"/api/v1/sessions/{healthy.session_id}"
    with demo_server.client() as c:
        before = c.get(url).json()
        for raw in (
            b"{bad",
            b'{"noise_scale": 1.5}',
            b'{"steps": [1200]}',
            b'{"unknown": 1}',
            b'{"mode": "audio"}',
        ):
            response = c.post(f"{url}/control", content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 422, (raw, response.text)
            assert response.json()["detail"]["error"], response.text
        after = c.get(url).json()
        assert after["settings"] == before["settings"] and after["prompts"] == before["prompts"]
        assert after["stats"]["epoch"] == before["stats"]["epoch"]

    async def socket() -> None:
        ws_url = demo_server.url.replace("http", "ws") + f"{url}/ws"
        async with websockets.connect(ws_url) as ws:
            await ws.send('{"id": "w1", "noise_scale": -1}')
            await ws.send('{"id": "w2", "seed": 11}')
            replies = {}
            while len(replies) < 2:
                message = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if message["type"] in ("ack", "error"):
                    replies[message["id"]] = message
            assert replies["w1"]["type"] == "error" and "noise_scale" in replies["w1"]["error"]
            assert replies["w2"]["type"] == "ack" and replies["w2"]["applied"] == ["seed"]
            status = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert status["type"] == "status" and status["session_id"] == healthy.session_id

    asyncio.run(socket())
    with demo_server.client() as c:
        assert c.get(url).json()["settings"]["seed"] == 11


def test_uploads_are_limited_to_videos(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict, media_dir: Path
) -> None:
    mp4_head = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    with demo_server.client() as c:
        big = mp4_head + bytes(2 * 1024 * 1024)  # the server's limit is 1 MiB
        response = c.put("/api/v1/media/big.mp4", content=big, headers={"content-type": "video/mp4"})
        assert response.status_code == 413 and "limit" in response.json()["detail"]
        response = c.put(
            "/api/v1/media/notes.mp4",
            content=b"just some text, not a video at all",
            headers={"content-type": "text/plain"},
        )
        assert response.status_code == 415
        response = c.put(
            "/api/v1/media/notes.mp4",
            content=b"just some text, not a video at all",
            headers={"content-type": "video/mp4"},
        )
        assert response.status_code == 415 and "not a video" in response.json()["detail"]
        response = c.put(
            "/api/v1/media/fake.mp4", content=mp4_head + b"\x00" * 512, headers={"content-type": "video/mp4"}
        )
        assert response.status_code == 415 and "not a readable video" in response.json()["detail"]
        response = c.put("/api/v1/media/script.sh", content=mp4_head, headers={"content-type": "video/mp4"})
        assert response.status_code == 400 and "not a video file name" in response.json()["detail"]
        good = (media_dir / "sample.mp4").read_bytes()
        response = c.put(
            "/api/v1/media/uploads/clip.mp4", content=good, headers={"content-type": "video/mp4"}
        )
        assert response.status_code == 201, response.text
        assert response.json()["width"] == 320
        assert (
            c.put(
                "/api/v1/media/uploads/clip.mp4", content=good, headers={"content-type": "video/mp4"}
            ).status_code
            == 409
        )
        names = {m["name"] for m in c.get("/api/v1/media").json()}
        assert {"sample.mp4", "uploads/clip.mp4"} <= names
    leftovers = [
        p.name
        for p in media_dir.rglob("*")
        if p.name.startswith(".") or p.name in ("big.mp4", "notes.mp4", "fake.mp4")
    ]
    assert leftovers == []  # rejected uploads leave nothing behind
    (media_dir / "uploads" / "clip.mp4").unlink()
    (media_dir / "uploads").rmdir()


def test_paths_outside_the_media_folder_are_refused(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict, media_dir: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.mp4"
    secret.write_bytes((media_dir / "sample.mp4").read_bytes())
    link = media_dir / "escape.mp4"
    link.symlink_to(secret)
    try:
        with demo_server.client() as c:
            for name in (
                "../secret.mp4",
                "/etc/passwd",
                "a/../../secret.mp4",
                "..\\secret.mp4",
                ".hidden.mp4",
                "escape.mp4",
                str(secret),
            ):
                response = c.post("/api/v1/sessions", json={"source": "file", "file": name})
                assert response.status_code == 400, (name, response.text)
                assert "media" in response.json()["detail"] or "invalid" in response.json()["detail"], (
                    response.text
                )
            for raw_path in ("/api/v1/media/..%2F..%2Fsecret.mp4", "/api/v1/media/%2E%2E/escape2.mp4"):
                response = c.put(raw_path, content=b"x", headers={"content-type": "video/mp4"})
                assert response.status_code == 400, (raw_path, response.text)
            missing = c.post("/api/v1/sessions", json={"source": "file", "file": "nope.mp4"})
            assert missing.status_code == 404
    finally:
        link.unlink()
    assert not (tmp_path.parent / "escape2.mp4").exists()


def test_cross_site_requests_are_refused(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """CORS closed: another site's page cannot drive the server, and a rebound DNS name is not this host."""
    with demo_server.client() as c:
        response = c.post(
            "/api/v1/sessions", json={"source": "text"}, headers={"Origin": "http://evil.example"}
        )
        assert response.status_code == 403 and "cross-origin" in response.json()["detail"]
        assert "access-control-allow-origin" not in response.headers
        response = c.get("/health", headers={"Host": "evil.example:8000"})
        assert response.status_code == 403
        same_origin = c.get("/health", headers={"Origin": demo_server.url})
        assert same_origin.status_code == 200


def test_model_reload_refused_while_streaming(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    with demo_server.client() as c:
        response = c.post("/api/v1/model/load", json={"demo": True})
        assert response.status_code == 409 and "stop them" in response.json()["detail"]
        assert c.get("/api/v1/model").json()["state"] == "loaded"


# ----------------------------------------------------------------------------------------------------
# Tokens on a non-local bind (their own servers, no model needed)


def test_non_local_bind_without_token_refuses_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    from wanstream.cli.main import main

    for host in ("0.0.0.0", "192.168.1.20", "::"):
        assert main(["serve", "--host", host]) == 2
        assert f"refusing to listen on {host} without a token" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--token", "short"]) == 2
    assert "too short" in capsys.readouterr().err


def test_token_checked_on_every_request() -> None:
    """The real app configured for a non-local bind: every HTTP route, the signalling and the WebSocket
    need the token (checked before anything else); with it, requests reach the routes."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from wanstream.server import ServerConfig, create_app

    token = "s3cret-token-xyz"
    app = create_app(ServerConfig(host="0.0.0.0", token=token, preload=False))
    good = {"Authorization": f"Bearer {token}"}
    with TestClient(app, base_url="http://192.168.1.20:8000") as c:
        requests = [
            ("GET", "/health", None),
            ("GET", "/metrics", None),
            ("GET", "/docs", None),
            ("GET", "/openapi.json", None),
            ("GET", "/", None),
            ("GET", "/api/v1/model", None),
            ("POST", "/api/v1/model/load", {"demo": True}),
            ("POST", "/api/v1/webrtc/offer", {"sdp": "v=0", "type": "offer"}),
            ("PATCH", "/api/v1/webrtc/offer/x", {"candidates": []}),
            ("DELETE", "/api/v1/webrtc/offer/x", None),
            ("POST", "/api/v1/sessions", {"source": "text"}),
            ("POST", "/api/v1/sessions/x/control", {"seed": 1}),
            ("GET", "/api/v1/sessions/x/frame.jpg", None),
            ("PUT", "/api/v1/media/a.mp4", None),
        ]
        for method, path, body in requests:
            for headers in ({}, {"Authorization": "Bearer wrong-token-123"}, {"X-Wanstream-Token": "nope"}):
                response = c.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert "token" in response.json()["detail"]
        assert c.get("/health", headers=good).status_code == 200
        assert c.get("/health", headers={"X-Wanstream-Token": token}).status_code == 200
        # With the token the offer reaches the route (no model loaded here: 503, not 401).
        response = c.post("/api/v1/webrtc/offer", json={"sdp": "v=0", "type": "offer"}, headers=good)
        assert response.status_code == 503 and "no model is loaded" in response.json()["detail"]
        via_query = c.get("/health", params={"token": token})
        assert via_query.status_code == 200 and "HttpOnly" in via_query.headers["set-cookie"]
        assert c.get("/api/v1/model").status_code == 200  # the cookie the query set
        c.cookies.clear()
        with pytest.raises(WebSocketDisconnect) as refused, c.websocket_connect("/api/v1/sessions/none/ws"):
            pass
        assert refused.value.code == 1008
        with c.websocket_connect("/api/v1/sessions/none/ws", headers=good) as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 4404  # past the guard: the session does not exist
