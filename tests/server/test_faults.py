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

import httpx
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


def test_a_port_in_use_is_an_error_before_anything_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from wanstream.cli.main import main
    from wanstream.server import app

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server was built although its port is taken")

    monkeypatch.setattr(app, "create_app", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--demo", "--port", str(port)]) == 2
    assert f"127.0.0.1:{port} is in use" in capsys.readouterr().err
    for bad in ("0", "65536", "http"):
        with pytest.raises(SystemExit):
            main(["serve", "--port", bad])
        assert "argument --port" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------------------------------
# A hostile or careless client (issue 18): every limit is checked before the work, with a clear answer


def _control(c: httpx.Client, session_id: str, raw: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return c.post(f"/api/v1/sessions/{session_id}/control", content=raw, headers=headers)


def test_bodies_over_their_route_limit_or_nested_too_deep(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """413 before parsing for a body over its route's limit (10 MB prompt included); 422 for deep JSON."""
    sid = healthy.session_id
    with demo_server.client() as c:
        before = c.get(f"/api/v1/sessions/{sid}").json()
        huge_prompt = json.dumps({"prompts": ["x" * 10_000_000]}).encode()
        start = time.monotonic()
        response = _control(c, sid, huge_prompt)
        assert response.status_code == 413 and "at most 65536" in response.json()["detail"], response.text
        assert time.monotonic() - start < 5
        response = c.post("/api/v1/sessions", content=b"{" + b" " * 300_000 + b"}")
        assert response.status_code == 413 and "262144" in response.json()["detail"]
        deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000  # 1.1 MB: Python's json would hit RecursionError
        for path in ("/api/v1/timeline/parse", "/api/v1/timeline/export"):
            response = c.post(path, content=deep, headers={"content-type": "application/json"})
            assert response.status_code == 422, (path, response.text)
            assert "nested 100000 levels deep; at most 32" in response.json()["detail"]
        response = _control(c, sid, b"[" * 40 + b"]" * 40)
        assert response.status_code == 422 and "nested 40 levels" in response.json()["detail"]
        response = c.post(
            "/api/v1/webrtc/offer", content=b"[" * 50_000, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
        after = c.get(f"/api/v1/sessions/{sid}").json()
        assert after["prompts"] == before["prompts"] and after["settings"] == before["settings"]


def test_prompts_that_cannot_fit_are_refused_with_the_limit(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """Characters (8192 a prompt) on every channel, before any work; the token count is the real model's
    (`test_prompt_tokens_are_counted_with_the_loaded_tokenizer`): the demo's toy tokenizer spells unknown
    words letter by letter, so a long but ordinary prompt plays there as it would on the real model."""
    import websockets

    sid = healthy.session_id
    words = " ".join(f"word{i}" for i in range(200))  # ~1,400 characters: fine for the real model
    too_long = "y" * 9000
    with demo_server.client() as c:
        before = c.get(f"/api/v1/sessions/{sid}").json()
        response = _control(c, sid, json.dumps({"prompts": [too_long]}).encode())
        assert response.status_code == 422 and "at most 8192" in response.text, response.text
        response = c.post("/api/v1/sessions", json={"source": "text", "prompts": [PROMPT, too_long]})
        assert response.status_code == 422 and "8192" in response.text, response.text
        after = c.get(f"/api/v1/sessions/{sid}").json()
        assert after["prompts"] == before["prompts"]
        events = c.get(f"/api/v1/sessions/{sid}/events").json()
        assert all(too_long not in json.dumps(e) for e in events)
        response = _control(c, sid, json.dumps({"prompts": [words]}).encode())
        assert response.status_code == 200, response.text
        response = _control(c, sid, json.dumps({"prompts": [PROMPT]}).encode())
        assert response.status_code == 200, response.text

    async def socket() -> None:
        ws_url = demo_server.url.replace("http", "ws") + f"/api/v1/sessions/{sid}/ws"
        async with websockets.connect(ws_url) as ws:
            await ws.send(json.dumps({"id": "long", "prompts": [too_long]}))
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if message.get("id") == "long":
                    break
            assert message["type"] == "error" and "8192" in message["error"], message

    asyncio.run(socket())


def test_prompt_tokens_are_counted_with_the_loaded_tokenizer() -> None:
    """A model's own tokenizer decides: a prompt over its encoder's length is refused, naming the limit (the
    demo components stand in for a real model here, with their 64-token encoder)."""
    import dataclasses

    from wanstream import Pipeline
    from wanstream.server.limits import prompt_problem

    components = dataclasses.replace(Pipeline.demo().components, demo=False)
    words = " ".join(f"word{i}" for i in range(200))
    problem = prompt_problem(components, [PROMPT, words])
    assert problem is not None and problem.startswith("prompts[1] is ") and "reads at most 64" in problem
    assert prompt_problem(components, [PROMPT]) is None
    assert prompt_problem(Pipeline.demo().components, [words]) is None  # the demo: characters only


def test_image_bomb_is_refused_from_its_header(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict, media_dir: Path
) -> None:
    """A 16000×16000 PNG is refused from its header, before a pixel is decoded (413 at once, nothing kept);
    so is a 5000×5000 one (over 16 megapixels, under Pillow's own bomb check)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 16000, 16000, 8, 2, 0, 0, 0)
    rows = zlib.compress(bytes(64 * (16000 * 3 + 1)), 9)  # the first rows: a decoder would go on for 768 MB
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    with demo_server.client() as c:
        start = time.monotonic()
        response = c.put("/api/v1/media/bomb.png", content=bomb, headers={"content-type": "image/png"})
        took = time.monotonic() - start
        assert response.status_code == 413, response.text
        assert "is over" in response.json()["detail"] and "16 megapixels" in response.json()["detail"]
        assert took < 5, took
        header = struct.pack(">IIBBBBB", 5000, 5000, 8, 2, 0, 0, 0)
        big = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
        response = c.put("/api/v1/media/big.png", content=big, headers={"content-type": "image/png"})
        assert response.status_code == 413 and "5000×5000" in response.json()["detail"], response.text
    assert not any(p.name.endswith(".png") or ".upload" in p.name for p in media_dir.rglob("*"))


def test_timeline_errors_are_422_not_500(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    segment = {"start": 0, "end": 2, "prompts": [{"text": "a"}]}
    cases = [
        ({"loras": ["abc"]}, "settings.loras[0]"),
        ({"loras": [{"bogus": 1}]}, "settings.loras[0].path"),
        ({"denoising_steps": 5}, "settings.denoising_steps"),
        ({"seed": True}, "settings.seed"),
        ({"noise_scale": "x"}, "settings.noise_scale"),
    ]
    with demo_server.client() as c:
        for settings, loc in cases:
            response = c.post("/api/v1/timeline/export", json={"segments": [segment], "settings": settings})
            assert response.status_code == 422, (settings, response.text)
            assert loc in [p["loc"] for p in response.json()["detail"]["problems"]], response.text
        good = {"denoising_steps": [700, 500], "loras": [{"path": "a.safetensors", "scale": 0.5}]}
        response = c.post("/api/v1/timeline/export", json={"segments": [segment], "settings": good})
        assert response.status_code == 200, response.text


def test_numbers_are_strict(demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict) -> None:
    """`true` is not the seed 1, "5" is not 5: refused everywhere a client sends settings."""
    sid = healthy.session_id
    with demo_server.client() as c:
        seed = c.get(f"/api/v1/sessions/{sid}").json()["settings"]["seed"]
        for raw in (b'{"seed": true}', b'{"seed": "5"}', b'{"steps": [true]}', b'{"height": 128.0}'):
            response = _control(c, sid, raw)
            assert response.status_code == 422, (raw, response.text)
        response = c.post("/api/v1/sessions", json={"source": "text", "settings": {"seed": True}})
        assert response.status_code == 422 and "settings" in response.text
        assert c.get(f"/api/v1/sessions/{sid}").json()["settings"]["seed"] == seed


def test_resolutions_the_device_cannot_serve_are_refused_up_front(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """4096×4096: refused before anything is allocated (a new stream, or a live change), with the estimate."""
    sid = healthy.session_id
    with demo_server.client() as c:
        deadline = time.monotonic() + 30
        while c.get(f"/api/v1/sessions/{sid}").json()["stats"]["chunks"] < 4:  # measured past its warm-up
            assert time.monotonic() < deadline
            time.sleep(0.1)
        start = time.monotonic()
        big = {"height": 4096, "width": 4096}
        response = c.post("/api/v1/sessions", json={"source": "text", "settings": big})
        assert response.status_code == 422, response.text
        assert "per chunk" in response.json()["detail"] and "limit is 20 s" in response.json()["detail"]
        response = _control(c, sid, json.dumps(big).encode())
        assert response.status_code == 422 and "per chunk" in response.json()["detail"]["error"]
        assert time.monotonic() - start < 5
        assert c.get(f"/api/v1/sessions/{sid}").json()["settings"]["height"] == 128


def test_websocket_binary_frames_and_floods(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """A binary frame gets an error (the stream and the socket go on); 300 messages sent without reading
    replies all get their reply (back-pressure, never a silent drop); leaving does not say the stream ended."""
    import websockets

    sid = healthy.session_id

    async def socket() -> None:
        ws_url = demo_server.url.replace("http", "ws") + f"/api/v1/sessions/{sid}/ws"
        async with websockets.connect(ws_url) as ws:
            await ws.send(b"\x00\x01binary")
            while (message := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] == "status":
                pass
            assert message["type"] == "error" and "binary frames" in message["error"], message
            await ws.send(json.dumps({"id": "after", "seed": 5}))
            while (message := json.loads(await asyncio.wait_for(ws.recv(), 20))).get("id") != "after":
                pass
            assert message["type"] == "ack"
            n = 300
            for i in range(n):
                body = {"id": i, "noise_scale": 5} if i % 3 else {"id": i, "seed": i}
                await ws.send(json.dumps(body))
            replies: dict[int, dict] = {}
            while len(replies) < n:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if message["type"] in ("ack", "error"):
                    replies[message["id"]] = message
            assert sorted(replies) == list(range(n))
            assert all(replies[i]["type"] == "error" for i in range(n) if i % 3)
            pending = [replies[i] for i in range(0, n, 3) if replies[i]["type"] == "error"]
            assert all("pending" in r["error"] for r in pending), pending[:3]
        # The client left: the stream runs on (the baseline checks it), and no stream_stopped was sent.

    asyncio.run(socket())


REFUSED_CANDIDATES = [
    ("candidate:1 1 udp 2122260223 169.254.169.254 80 typ host", "link-local"),
    ("candidate:1 1 udp 2122260223 169.254.10.1 40000 typ host", "link-local"),
    ("candidate:1 1 udp 2122260223 fe80::1 40000 typ host", "link-local"),
    ("candidate:1 1 udp 2122260223 fd00:ec2::254 80 typ host", "metadata"),
    ("candidate:1 1 udp 2122260223 ::ffff:169.254.169.254 80 typ host", "link-local"),
    ("candidate:1 1 udp 2122260223 0.0.0.0 40000 typ host", "unspecified"),
    ("candidate:1 1 udp 2122260223 224.0.0.251 5353 typ host", "multicast"),
    ("candidate:1 1 udp 2122260223 255.255.255.255 40000 typ host", "broadcast"),
    ("candidate:1 1 udp 2122260223 127.0.0.1 0 typ host", "port 0"),
]


def test_ice_candidates_to_refused_addresses_never_reach_ice(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """Refused where candidates are parsed (trickled, or inside an offer), before aiortc sees them. Only
    refused addresses are sent here: nothing in this test may make the server send to a non-loopback host."""
    with demo_server.client() as c:
        for line, reason in REFUSED_CANDIDATES:
            body = {"candidates": [{"candidate": line, "sdpMid": "0"}]}
            response = c.patch(f"/api/v1/webrtc/offer/{healthy.session_id}", json=body)
            assert response.status_code == 400, (line, response.text)
            assert (
                "ICE candidate refused" in response.json()["detail"] and reason in response.json()["detail"]
            )
        sdp = (
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
            "c=IN IP4 0.0.0.0\r\na=sendrecv\r\na=" + REFUSED_CANDIDATES[0][0] + "\r\n"
        )
        response = c.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
        assert response.status_code == 400 and "link-local" in response.json()["detail"], response.text


def test_ice_candidates_are_counted_per_session(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """At most 32 trickled candidates per session (loopback ones here); the 33rd is refused."""

    async def run() -> None:
        async with demo_server.async_client() as http:
            ghost = RtcClient(http)  # never applies the answer: its session waits for ICE
            response = await ghost.offer(settings={"mode": "text"}, prompts=[PROMPT])
            assert response.status_code == 200, response.text
            ghost_id = response.json()["session_id"]
            url = f"/api/v1/webrtc/offer/{ghost_id}"
            lines = [f"candidate:{i} 1 udp 2122260223 127.0.0.1 {40000 + i} typ host" for i in range(33)]
            body = {"candidates": [{"candidate": line, "sdpMid": "0"} for line in lines[:32]]}
            assert (await http.patch(url, json=body)).status_code == 204
            response = await http.patch(url, json={"candidates": [{"candidate": lines[32], "sdpMid": "0"}]})
            assert response.status_code == 400 and "at most 32 per session" in response.json()["detail"]
            await http.delete(url)
            await ghost.close()
            await wait_sessions(http, 1)

    asyncio.run(run())


DEAD_CLIENT = """
import asyncio, sys, httpx
from server.rtc_client import RtcClient

async def main():
    async with httpx.AsyncClient(base_url=sys.argv[1], timeout=30) as http:
        client = RtcClient(http)
        sid = await client.connect(settings={"mode": "text"}, prompts=["a dead client"])
        await client.wait_frames(1)
        print(sid, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_killed_client_frees_its_slot_within_5_s(
    demo_server: ServerProcess, healthy: BackgroundClient, baseline: dict
) -> None:
    """SIGKILL: no goodbye, no DTLS close. ICE consent freshness notices within 5 s and the slot is freed."""
    import os
    import signal
    import subprocess
    import sys

    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", DEAD_CLIENT, demo_server.url], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        sid = proc.stdout.readline().strip()
        assert sid, "the client did not connect"
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
        with demo_server.client() as c:
            while sid in {s["session_id"] for s in c.get("/api/v1/sessions").json()}:
                assert time.monotonic() - killed < 15, "the dead client's session is still there"
                time.sleep(0.05)
            gone = time.monotonic() - killed
    finally:
        proc.kill()
        proc.wait()
    print(f"\nSIGKILLed client: its session was gone {gone:.2f}s later")
    # Consent freshness gives up within 5 s; the teardown then waits for the chunk in flight (demo: < 1 s).
    assert gone < 6.0, gone


def test_stopping_a_stream_mid_chunk_frees_everything_within_a_chunk() -> None:
    """The freeze of issue 18: a slow stream mid-chunk, a second stream starting beside it, then DELETE.

    The event loop never waits for the engine: /health answers within 1 s throughout (the new stream's
    LoRA set-up waits for the running chunk on its own engine thread). DELETE returns within the chunk in
    flight + 1 s, and by then the engine thread has ended, its session (the memory) is released and the slot
    is free; until then the slot still counts (a third stream is refused)."""
    import threading

    from server.harness import InProcessServer
    from wanstream.server import ServerConfig, create_app

    config = ServerConfig(demo=True, max_sessions=2, max_chunk_s=120.0)
    slow = {"height": 480, "width": 832, "steps": [1000, 750, 500, 250], "batching": "none"}
    with InProcessServer(create_app(config)) as server, server.client() as c:
        deadline = time.monotonic() + 60
        while c.get("/health").json()["model"] != "loaded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        response = c.post("/api/v1/sessions", json={"source": "text", "settings": slow, "prompts": [PROMPT]})
        assert response.status_code == 201, response.text
        slow_id = response.json()["session_id"]
        manager = server.app.state.sessions
        worker = manager.sessions[slow_id].worker
        while worker.stats().chunks < 1:
            time.sleep(0.05)
        latencies: list[float] = []
        polling = threading.Event()

        def poll_health() -> None:
            with server.client() as h:
                while not polling.is_set():
                    start = time.monotonic()
                    assert h.get("/health", timeout=10).status_code == 200
                    latencies.append(time.monotonic() - start)
                    time.sleep(0.05)

        poller = threading.Thread(target=poll_health)
        poller.start()
        try:
            small = {"height": 64, "width": 64}
            response = c.post(
                "/api/v1/sessions", json={"source": "text", "settings": small, "prompts": [PROMPT]}
            )
            assert response.status_code == 201, response.text
            other_id = response.json()["session_id"]
            response = c.post("/api/v1/sessions", json={"source": "text", "settings": small})
            assert response.status_code == 409  # both slots taken
            while worker.stats().chunks < 2:
                time.sleep(0.05)
            time.sleep(0.3)  # into the next chunk
            started = time.monotonic()
            assert c.delete(f"/api/v1/sessions/{slow_id}").status_code == 204
            took = time.monotonic() - started
        finally:
            polling.set()
            poller.join()
        in_flight = worker._chunk_latency.values[-1]  # the chunk that was running at DELETE
        names = [t.name for t in threading.enumerate()]
        assert f"wanstream-engine-{slow_id}" not in names and worker.join(0)
        assert worker.session is None  # its caches (the memory) went with the thread
        assert slow_id not in manager.sessions
        print(
            f"\nslow stream ({slow['width']}×{slow['height']}, 4 steps): chunk {in_flight:.2f}s; DELETE took "
            f"{took:.2f}s; /health max {max(latencies):.3f}s over {len(latencies)} polls"
        )
        assert took <= in_flight + 1.0, (took, in_flight)
        assert max(latencies) < 1.0, max(latencies)
        response = c.post("/api/v1/sessions", json={"source": "text", "settings": small})
        assert response.status_code == 201  # the slot is free at once
        for sid in (other_id, response.json()["session_id"]):
            assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204


def test_tokens_never_logged_and_half_open_connections_closed(tmp_path: Path) -> None:
    """A token server (no model): `?token=` is redacted in the access log; a connection whose headers never
    finish is closed after --header-timeout; a token of spaces refuses to start."""
    import socket

    from server.harness import TOKEN
    from wanstream.cli.main import main

    assert main(["serve", "--host", "0.0.0.0", "--token", " " * 8]) == 2
    server = ServerProcess(
        "--no-preload", "--header-timeout", "1", log_path=tmp_path / "server.log", token=TOKEN
    )
    try:
        server.wait_ready(model=False)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/health", params={"token": TOKEN}).status_code == 200
            assert c.get("/api/v1/model", params={"x": "1", "token": TOKEN}).status_code == 200
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
            start = time.monotonic()
            assert raw.recv(1024) == b""  # closed by the server, without an answer
            closed_after = time.monotonic() - start
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
            start = time.monotonic()
            assert idle.recv(1024) == b""  # nothing sent at all
            idle_closed = time.monotonic() - start
    finally:
        assert server.stop() == 0
    log = server.log_path.read_text()
    print(f"\nhalf-open connection closed after {closed_after:.2f}s, a silent one after {idle_closed:.2f}s")
    assert 0.5 < closed_after < 5 and 0.5 < idle_closed < 5
    assert "token=***" in log and TOKEN not in log, log


def test_sigterm_ends_a_server_mid_chunk_with_a_socket_open(tmp_path: Path) -> None:
    """SIGTERM while a slow stream computes and a WebSocket is open: the server exits cleanly, within the
    graceful-shutdown time (10 s) + the chunk in flight (before: SIGTERM was ignored for minutes)."""
    import signal

    import websockets

    server = ServerProcess("--demo", "--max-chunk-seconds", "120", log_path=tmp_path / "server.log")
    server.wait_ready()
    slow = {"height": 480, "width": 832, "steps": [1000, 750, 500, 250], "batching": "none"}
    with server.client() as c:
        response = c.post("/api/v1/sessions", json={"source": "text", "settings": slow})
        assert response.status_code == 201, response.text
        sid = response.json()["session_id"]
        while c.get(f"/api/v1/sessions/{sid}").json()["stats"]["chunks"] < 1:
            time.sleep(0.1)
        chunk = c.get(f"/api/v1/sessions/{sid}").json()["stats"]["chunk_latency_p90"]

    async def hold_socket_and_stop() -> float:
        ws_url = server.url.replace("http", "ws") + f"/api/v1/sessions/{sid}/ws"
        async with websockets.connect(ws_url) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # a status message: the socket is live
            server.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            while server.proc.poll() is None:
                assert time.monotonic() - start < 10 + 2 * chunk + 10, "SIGTERM did not end the server"
                await asyncio.sleep(0.1)
            return time.monotonic() - start

    took = asyncio.run(hold_socket_and_stop())
    print(f"\nSIGTERM mid-chunk ({chunk:.2f}s chunks) with a WebSocket open: exited after {took:.2f}s")
    # uvicorn shuts down, then re-raises the signal: the exit status says SIGTERM ended it
    assert server.stop() in (0, -signal.SIGTERM), server.log()
    assert "Application shutdown complete" in server.log_path.read_text()
