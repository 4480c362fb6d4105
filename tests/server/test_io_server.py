"""The live rig over HTTP against `serve --demo`: MPEG-TS decoded while the stream runs, sinks added and
removed per session with their errors, /api/v1/hardware and the /health summary, sink metrics."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import av
import httpx
import numpy as np
import pytest

from server.harness import ServerProcess


class _HttpReader:
    """A file-like view of a streamed HTTP body, for PyAV to demux while it arrives."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        while len(self._buffer) < max(size, 1):
            try:
                chunk = next(self._chunks)
            except StopIteration:
                break
            self.received += len(chunk)
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _decode_live(url: str, frames: int, on_frame: object = None) -> list[np.ndarray]:
    """Decode `frames` frames from a live MPEG-TS URL as they arrive."""
    decoded: list[np.ndarray] = []
    with httpx.stream("GET", url, timeout=httpx.Timeout(30.0)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "video/mp2t"
        reader = _HttpReader(response.iter_bytes())
        # A live stream: read only what identifies the stream (the first keyframe carries it), not 5 MB.
        options = {"probesize": "32768", "analyzeduration": "0", "fflags": "nobuffer"}
        with av.open(reader, format="mpegts", options=options) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            for frame in container.decode(video=0):
                decoded.append(frame.to_ndarray(format="rgb24"))
                if callable(on_frame):
                    on_frame(len(decoded))
                if len(decoded) >= frames:
                    break
    return decoded


def _metric(text: str, name: str, **labels: str) -> float | None:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(label)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_live_mpegts_decodes_while_the_stream_runs_and_across_a_prompt_cut(server: ServerProcess) -> None:
    with server.client() as c:
        created = c.post(
            "/api/v1/sessions",
            json={"source": "text", "prompts": ["a lighthouse at dusk"], "sinks": [{"kind": "ts"}]},
        )
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        acks: list[dict[str, object]] = []

        def cut_once(count: int) -> None:
            if count == 6:  # mid-stream: a prompt cut flushes every sink's queue
                ack = c.post(
                    f"/api/v1/sessions/{sid}/control", json={"prompts": ["a forest"], "switch": "cut"}
                )
                assert ack.status_code == 200, ack.text
                acks.append(ack.json())

        try:
            frames = _decode_live(f"{server.url}/api/v1/sessions/{sid}/output.ts", 16, cut_once)
            assert acks and acks[0]["flushed"] is True
            assert len(frames) == 16 and all(f.shape == (128, 128, 3) for f in frames)
            assert len({f.tobytes() for f in frames}) > 1  # a moving stream, not one frame repeated
            info = c.get(f"/api/v1/sessions/{sid}").json()
            (ts,) = info["sinks"]
            assert (
                ts["id"] == "ts" and ts["state"] == "running" and ts["encoder"] in ("libx264", "libopenh264")
            )
            assert ts["written"] >= 16 and ts["stale"] >= 0 and "dropped" in ts
            metrics = c.get("/metrics").text
            assert (_metric(metrics, "wanstream_sink_frames_total", sink="ts") or 0) >= 16
            assert _metric(metrics, "wanstream_sink_dropped_frames_total", sink="ts") is not None
            assert _metric(metrics, "wanstream_sink_up", session=sid, sink="ts") == 1.0
        finally:
            c.delete(f"/api/v1/sessions/{sid}")


def test_output_ts_adds_the_encoder_on_first_use_and_a_second_viewer_shares_it(server: ServerProcess) -> None:
    with server.client() as c:
        sid = c.post("/api/v1/sessions", json={"source": "text"}).json()["session_id"]
        try:
            assert c.get(f"/api/v1/sessions/{sid}/sinks").json() == []
            url = f"{server.url}/api/v1/sessions/{sid}/output.ts"
            assert len(_decode_live(url, 3)) == 3
            assert len(_decode_live(url, 3)) == 3
            (ts,) = c.get(f"/api/v1/sessions/{sid}/sinks").json()
            assert ts["id"] == "ts"
            assert c.delete(f"/api/v1/sessions/{sid}/sinks/ts").status_code == 204
            assert c.get(f"/api/v1/sessions/{sid}/sinks").json() == []
        finally:
            c.delete(f"/api/v1/sessions/{sid}")


def test_sinks_per_session_are_validated_and_errors_name_the_reason(server: ServerProcess) -> None:
    with server.client() as c:
        hardware = c.get("/api/v1/hardware").json()
        sid = c.post("/api/v1/sessions", json={"source": "text"}).json()["session_id"]
        try:
            base = f"/api/v1/sessions/{sid}/sinks"
            assert c.post(base, json={"kind": "rtmp"}).status_code == 422
            assert c.post(base, json={"kind": "ts", "queue": 1000}).status_code == 422
            too_big = c.post(base, content=b'{"kind": "ts", "name": "' + b"x" * 8000 + b'"}')
            assert too_big.status_code == 413
            added = c.post(base, json={"kind": "ts", "queue": 4})
            assert added.status_code == 201 and added.json()["capacity"] == 4
            again = c.post(base, json={"kind": "ts"})  # one per id; the code lets a client treat it as done
            assert again.status_code == 409 and again.json()["detail"]["code"] == "sink_exists"
            assert c.delete(f"{base}/ndi:nothing").status_code == 404
            if not hardware["io"]["virtualcam"]["available"]:
                refused = c.post(base, json={"kind": "virtualcam"})
                assert refused.status_code == 422 and "virtual camera" in refused.json()["detail"]
            if sys.platform == "linux":
                refused = c.post(base, json={"kind": "spout", "name": "out"})
                assert refused.status_code == 422 and "Windows-only" in refused.json()["detail"]
            assert [s["id"] for s in c.get(base).json()] == ["ts"]  # the refusals left nothing behind
        finally:
            c.delete(f"/api/v1/sessions/{sid}")
        # A sink a new session names but that cannot open here refuses the start, with the reason.
        if sys.platform == "linux":
            refused = c.post("/api/v1/sessions", json={"source": "text", "sinks": [{"kind": "syphon"}]})
            assert refused.status_code == 422 and "macOS-only" in refused.json()["detail"]
        refused = c.post("/api/v1/sessions", json={"source": "text", "ndi": {"address": "127.0.0.1:5961"}})
        assert refused.status_code == 422  # 'ndi' belongs to source 'ndi'


def test_hardware_report_and_health_summary(server: ServerProcess) -> None:
    with server.client() as c:
        report = c.get("/api/v1/hardware").json()
        health = c.get("/health").json()
    io = report["io"]
    assert set(io) >= {"webrtc", "screen_capture", "ts", "ndi", "virtualcam", "spout", "syphon"}
    for kind, entry in io.items():
        assert isinstance(entry["available"], bool) and entry["reason"], kind
    assert io["ts"]["available"] and io["webrtc"]["available"]
    if sys.platform == "linux":
        assert not io["spout"]["available"] and "Windows-only" in io["spout"]["reason"]
        assert not io["syphon"]["available"] and "macOS-only" in io["syphon"]["reason"]
    if report["gpus"]:
        assert report["gpu"] == report["gpus"][0]["name"] and report["gpus"][0]["vram_bytes"] > 0
    else:
        assert report["gpu"] == "no GPU"
    summary = health["hardware"]
    assert summary["gpu"] == report["gpu"]
    assert summary["io"] == sorted(k for k, v in io.items() if v["available"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--sink", "rtmp"), "--sink rtmp: Input should be"),
        (("--ndi-in", "CAM (OBS)", "--no-ndi-discovery"), "give the source as HOST:PORT"),
    ],
)
def test_serve_refuses_io_flags_it_cannot_use(flags: tuple[str, ...], message: str) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "wanstream.cli.main", "serve", "--demo", "--port", "1", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_webrtc_stream_names_its_sinks_in_the_offer(server: ServerProcess) -> None:
    import asyncio

    from server.harness import wait_sessions
    from server.rtc_client import RtcClient, SyntheticCamera

    async def run() -> None:
        async with server.async_client() as http:
            refused = RtcClient(http, camera=SyntheticCamera(fps=30))
            response = await refused.offer(sinks=[{"kind": "ts"}, {"kind": "ts"}])
            assert response.status_code == 422 and "already has the sink 'ts'" in response.text
            await refused.close()
            await wait_sessions(http, 0)
            client = RtcClient(http, camera=SyntheticCamera(fps=30))
            sid = await client.connect(sinks=[{"kind": "ts", "queue": 16}])
            await client.wait_frames(5)
            (ts,) = (await http.get(f"/api/v1/sessions/{sid}/sinks")).json()
            assert ts["id"] == "ts" and ts["capacity"] == 16 and ts["state"] == "running"
            await client.close()
            await wait_sessions(http, 0)

    asyncio.run(run())


def test_serve_help_documents_the_live_rig_flags() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "wanstream.cli.main", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    for flag in ("--sink KIND[:NAME]", "--ndi-in SOURCE", "--no-ndi-discovery", "docs/live-rig.md"):
        assert flag in done.stdout, flag
