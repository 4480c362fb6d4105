"""VACE on `wanstream serve --demo`: the input routed as control, reference images uploaded to the media
folder, `vace_context_scale` live over REST, the WebSocket and the WebRTC data channel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from server.harness import ServerProcess, wait_sessions
from server.rtc_client import RtcClient, SyntheticCamera


def png_bytes(height: int = 24, width: int = 32, seed: int = 0) -> bytes:
    import io

    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def chunk_rows(c: httpx.Client, sid: str, count: int, timeout: float = 40.0, **match: Any) -> list[dict]:
    """Wait until the event log holds `count` chunk rows matching `match`; return them."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [
            e
            for e in c.get(f"/api/v1/sessions/{sid}/events").json()
            if e["type"] == "chunk" and all(e.get(k) == v for k, v in match.items())
        ]
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} chunks like {match}"
        time.sleep(0.1)


@pytest.fixture
def reference(server: ServerProcess, media_dir: Path) -> str:
    name = "refs/vace-ref.png"
    with server.client() as c:
        put = c.put(
            f"/api/v1/media/{name}?overwrite=true", content=png_bytes(), headers={"content-type": "image/png"}
        )
        assert put.status_code == 201, put.text
        assert put.json() == {
            "name": name,
            "bytes": len(png_bytes()),
            "kind": "image",
            "width": 32,
            "height": 24,
        }
    return name


def test_model_status_says_vace_is_loaded(server: ServerProcess) -> None:
    with server.client() as c:
        assert c.get("/api/v1/model").json()["vace"] is True
        schema = c.get("/api/v1/settings/schema").json()["control"]["properties"]
        assert {"vace_context_scale", "vace_ref_images", "first_frame_image", "last_frame_image"} <= set(
            schema
        )


def test_headless_file_routed_as_control_and_live_scale(server: ServerProcess) -> None:
    """Scope's vace_use_input_video: the file's frames become control frames and the engine runs in text
    mode; the scale changes live and the event log shows it from the acknowledged chunk on."""
    with server.client() as c:
        created = c.post(
            "/api/v1/sessions",
            json={"source": "file", "file": "sample.mp4", "prompts": ["ink"], "vace": {"context_scale": 0.5}},
        )
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        status = c.get(f"/api/v1/sessions/{sid}").json()
        assert status["settings"]["mode"] == "text" and status["settings"]["batching"] == "none"
        assert status["vace"]["input_as_control"] is True and status["vace"]["context_scale"] == 0.5
        rows = chunk_rows(c, sid, 2, vace_mode="conditioning")
        assert {r["kind"] for r in rows} == {"text"} and {r["vace_context_scale"] for r in rows} == {0.5}
        assert [r["vace_control_frames"] for r in rows[:2]] == [5, 4]

        ack = c.post(f"/api/v1/sessions/{sid}/control", json={"id": "s", "vace_context_scale": 1.75})
        assert ack.status_code == 200 and ack.json()["applied"] == ["vace_context_scale"], ack.text
        later = chunk_rows(c, sid, 1, vace_context_scale=1.75)
        assert later[0]["chunk"] >= ack.json()["next_chunk"]
        events = c.get(f"/api/v1/sessions/{sid}/events").json()
        assert any(e["type"] == "control" and e["applied"] == ["vace_context_scale"] for e in events)
        assert c.get(f"/api/v1/sessions/{sid}").json()["vace"]["context_scale"] == 1.75

        # Out of range, unknown image, batching stream: refused, nothing changes.
        for body, expected in (
            ({"vace_context_scale": 2.5}, "less than or equal to 2"),
            ({"vace_ref_images": ["refs/none.png"]}, "no image 'refs/none.png'"),
            ({"vace_ref_images": ["../etc/passwd.png"]}, "invalid media name"),
            ({"first_frame_image": "sample.mp4"}, "not an image file name"),
            ({"batching": "stream"}, "needs batching 'none', not 'stream'"),
            ({"first_frame_image": "a.png", "last_frame_image": "b.png"}, "separate updates"),
        ):
            response = c.post(f"/api/v1/sessions/{sid}/control", json=body)
            assert response.status_code == 422 and expected in response.text, (body, response.text)
        assert c.get(f"/api/v1/sessions/{sid}").json()["vace"]["context_scale"] == 1.75
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204


def test_text_session_with_an_uploaded_reference(server: ServerProcess, reference: str) -> None:
    with server.client() as c:
        listed = c.get("/api/v1/media", params={"kind": "image"}).json()
        assert {"name": reference, "bytes": len(png_bytes()), "kind": "image"} in listed
        assert all(item["kind"] == "video" for item in c.get("/api/v1/media").json())
        created = c.post(
            "/api/v1/sessions",
            json={
                "source": "text",
                "prompts": ["a cat"],
                "vace": {"ref_images": [reference], "persist_refs": True},
            },
        )
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        rows = chunk_rows(c, sid, 2, vace_mode="r2v")
        assert {r["vace_references"] for r in rows} == {1}
        # A one-shot first frame and the references cleared, over the WebSocket (the data channel's messages).
        asyncio.run(
            ws_update(server, sid, {"id": "ff", "first_frame_image": reference, "vace_ref_images": []})
        )
        seen = chunk_rows(c, sid, 1, vace_mode="extension:firstframe")
        after = chunk_rows(c, sid, 1, vace_mode="none")
        assert seen[0]["vace_references"] == 0 and after[0]["chunk"] > seen[0]["chunk"]
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204


async def ws_update(server: ServerProcess, sid: str, message: dict[str, Any]) -> dict[str, Any]:
    import json

    import websockets

    url = server.url.replace("http", "ws") + f"/api/v1/sessions/{sid}/ws"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(message))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if reply["type"] in ("ack", "error"):
                assert reply["type"] == "ack" and reply["id"] == message["id"], reply
                return reply


def test_sessions_with_bad_vace_requests_never_start(server: ServerProcess, reference: str) -> None:
    with server.client() as c:
        for body, status, expected in (
            (
                {"source": "text", "vace": {"ref_images": ["refs/missing.png"]}},
                422,
                "no image 'refs/missing.png'",
            ),
            ({"source": "text", "vace": {"ref_images": ["sample.mp4"]}}, 400, "not an image file name"),
            ({"source": "text", "vace": {"context_scale": -1}}, 422, "greater than or equal to 0"),
            ({"source": "text", "settings": {"batching": "stream"}, "vace": {}}, 422, "chunk by chunk"),
            ({"source": "text", "vace": {"unknown": 1}}, 422, "Extra inputs"),
        ):
            response = c.post("/api/v1/sessions", json=body)
            assert response.status_code == status and expected in response.text, (body, response.text)
        assert c.get("/api/v1/sessions").json() == []
        # Without "vace" a stream has none: VACE updates are refused with the reason.
        sid = c.post("/api/v1/sessions", json={"source": "text"}).json()["session_id"]
        response = c.post(f"/api/v1/sessions/{sid}/control", json={"vace_context_scale": 1.0})
        assert response.status_code == 422 and "runs without VACE" in response.text
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204


def test_image_uploads_are_checked(server: ServerProcess) -> None:
    with server.client() as c:
        fake = c.put(
            "/api/v1/media/fake.png", content=b"GIF89a" + bytes(64), headers={"content-type": "image/png"}
        )
        assert fake.status_code == 415 and "not a image file" in fake.text
        broken = c.put(
            "/api/v1/media/broken.png",
            content=b"\x89PNG\r\n\x1a\n" + bytes(64),
            headers={"content-type": "image/png"},
        )
        assert broken.status_code == 415 and "does not decode" in broken.text
        wrong_type = c.put("/api/v1/media/x.png", content=png_bytes(), headers={"content-type": "video/mp4"})
        assert wrong_type.status_code == 415
        big = c.put("/api/v1/media/big.png", content=b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024))
        assert big.status_code == 413  # the server's --max-upload-mb 1
        assert c.put("/api/v1/media/notes.txt", content=b"hello").status_code == 400
        names = {item["name"] for item in c.get("/api/v1/media", params={"kind": "all"}).json()}
        assert not names & {"fake.png", "broken.png", "x.png", "big.png", "notes.txt"}


def test_webrtc_camera_routed_as_control_and_scale_on_the_data_channel(server: ServerProcess) -> None:
    async def run() -> None:
        async with server.async_client() as http:
            client = RtcClient(http, camera=SyntheticCamera(fps=30))
            sid = await client.connect(prompts=["a knight"], vace={"context_scale": 0.25})
            await client.wait_frames(5)
            status = (await http.get(f"/api/v1/sessions/{sid}")).json()
            assert status["settings"]["mode"] == "text" and status["vace"]["input_as_control"] is True
            ack = await client.send({"id": "scale", "vace_context_scale": 2.0})
            assert ack["type"] == "ack" and ack["applied"] == ["vace_context_scale"], ack
            bad = await client.send({"id": "bad", "vace_context_scale": 3})
            assert bad["type"] == "error" and "vace_context_scale" in bad["error"]
            deadline = time.monotonic() + 40
            while True:
                events = (await http.get(f"/api/v1/sessions/{sid}/events")).json()
                scales = [e["vace_context_scale"] for e in events if e["type"] == "chunk"]
                if scales and scales[0] == 0.25 and scales[-1] == 2.0:
                    break
                assert time.monotonic() < deadline, scales
                await asyncio.sleep(0.1)
            await client.close()
            await wait_sessions(http, 0)

    asyncio.run(run())


def test_no_vace_flag_leaves_the_module_out() -> None:
    """`wanstream serve --no-vace` (ServerConfig.vace=False): no VACE module, and the status says so."""
    import torch

    from wanstream.server.model import ModelManager

    threads = torch.get_num_threads()  # a CPU load leaves a core to the media path: restore it after
    manager = ModelManager(demo=True, models_dir=None, device="cpu", vace=False)
    manager.start_load()
    status = manager.wait(60)
    torch.set_num_threads(threads)
    assert status.state == "loaded" and status.vace is False
    assert manager.pipeline is not None and manager.pipeline.components.vace is None
