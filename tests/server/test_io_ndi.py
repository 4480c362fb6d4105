"""NDI sender → wanstream → NDI receiver on this machine's loopback, by direct address with discovery off
(no mDNS, no multicast: the runtime is pointed at a discovery server on 127.0.0.1, which turns mDNS off).
Frames are checked at both ends; a stalled sink next to the NDI one drops only its own frames.

Runs where ndi-python's bundled NDI runtime starts (Linux x86_64 / aarch64, Windows, macOS with
`pip install 'wanstream[live]'`); elsewhere it skips saying so.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import av
import httpx
import numpy as np
import pytest

from server.harness import InProcessServer
from wanstream.server.frames import OutputFrame
from wanstream.server.io import ndi as wndi
from wanstream.server.io.sinks import QueuedSink, SinkUnavailable

COLOUR = (200, 40, 90)  # the test sender's picture
SIZE = (120, 160)  # its height, width (the stream is 128×128)


@pytest.fixture(scope="module")
def ndi_runtime() -> Any:
    try:
        wndi.module()
    except SinkUnavailable as exc:
        pytest.skip(f"{exc} — the NDI loop runs wherever ndi-python installs (Linux, Windows, macOS)")
    if "NDI_CONFIG_DIR" in __import__("os").environ:
        pytest.skip("NDI_CONFIG_DIR is set: this test writes its own direct-only (no mDNS) NDI configuration")
    try:
        wndi.configure(discovery=False)
        return wndi.runtime()
    except (SinkUnavailable, RuntimeError) as exc:
        pytest.skip(
            f"the NDI runtime cannot start here ({exc}); the loop runs on any x86_64 (SSE4.2) or ARM64 machine "
            "where ndi-python's bundled runtime loads: Linux, Windows, macOS"
        )


class _TestSender:
    """An NDI source in this process sending a solid picture at 30 fps until stopped."""

    def __init__(self, ndi: Any) -> None:
        self._ndi = ndi
        before = wndi.own_listening_ports()
        create = ndi.SendCreate()
        create.ndi_name = "wanstream-test-in"
        create.clock_video = False
        self._sender = ndi.send_create(create)
        assert self._sender is not None
        new = sorted(wndi.own_listening_ports() - before)
        assert new, "the NDI sender opened no port"
        self.port = new[-1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def _run(self) -> None:
        image = np.empty((*SIZE, 4), dtype=np.uint8)
        image[..., :3] = COLOUR
        image[..., 3] = 255
        while not self._stop.wait(1 / 30):
            frame = self._ndi.VideoFrameV2(SIZE[1], SIZE[0], self._ndi.FOURCC_VIDEO_TYPE_RGBX)
            frame.frame_rate_N, frame.frame_rate_D = 30, 1
            frame.data = image
            self._ndi.send_send_video_v2(self._sender, frame)
            self.sent += 1

    def __enter__(self) -> _TestSender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._ndi.send_destroy(self._sender)


def _receive(ndi: Any, address: str, count: int, timeout: float = 60.0) -> Iterator[np.ndarray]:
    """`count` RGB frames from the NDI source at `address`."""
    create = ndi.RecvCreateV3()
    create.color_format = ndi.RECV_COLOR_FORMAT_RGBX_RGBA
    receiver = ndi.recv_create_v3(create)
    assert receiver is not None
    try:
        ndi.recv_connect(receiver, ndi.Source(p_ndi_name="", p_url_address=address))
        deadline = time.monotonic() + timeout
        got = 0
        while got < count:
            assert time.monotonic() < deadline, f"only {got} of {count} NDI frames from {address}"
            kind, video, _, _ = ndi.recv_capture_v2(receiver, 200)
            if kind != ndi.FRAME_TYPE_VIDEO:
                continue
            try:
                image = np.array(video.data)[..., :3]
            finally:
                ndi.recv_free_video_v2(receiver, video)
            got += 1
            yield image
    finally:
        ndi.recv_destroy(receiver)


class _Capture:
    """A plain FrameSink keeping the engine's recent frames (what NDI should carry)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.lock = threading.Lock()

    def put(self, frames: Sequence[OutputFrame]) -> None:
        with self.lock:
            self.frames = [*self.frames, *(f.image.copy() for f in frames)][-256:]

    def flush(self, epoch: int) -> None:
        pass


class _Stalled(QueuedSink):
    kind = "stalled"

    def __init__(self) -> None:
        super().__init__(capacity=4)
        self.gate = threading.Event()

    def write(self, frame: OutputFrame) -> None:
        self.gate.wait(60)


def _wait(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _dropped(c: httpx.Client, sink: str) -> float:
    match = re.search(
        rf'^wanstream_sink_dropped_frames_total\{{sink="{sink}"\}} (\S+)$', c.get("/metrics").text, re.M
    )
    return float(match.group(1)) if match else 0.0


def test_ndi_in_and_out_on_loopback_with_discovery_off(ndi_runtime: Any) -> None:
    from wanstream.server import ServerConfig, create_app

    ndi = ndi_runtime
    config = ServerConfig(
        demo=True, ndi_discovery=False, max_chunk_s=20.0, settings_overrides={"height": 128, "width": 128}
    )
    app = create_app(config)
    with _TestSender(ndi) as sender, InProcessServer(app) as server, server.client() as c:
        _wait(lambda: c.get("/health").json()["model"] == "loaded", what="the demo model")
        body = {
            "source": "ndi",
            "ndi": {"address": f"127.0.0.1:{sender.port}"},
            "sinks": [{"kind": "ndi", "name": "wanstream-test-out"}],
        }
        created = c.post("/api/v1/sessions", json=body)
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        session = app.state.sessions.sessions[sid]
        capture = _Capture()
        session.worker.add_sink(capture)
        try:
            # In: the sender's frames reach the engine.
            _wait(lambda: c.get(f"/api/v1/sessions/{sid}").json()["input"]["frames"] >= 10, what="NDI input")
            info = c.get(f"/api/v1/sessions/{sid}").json()
            assert info["input"]["connected"] and info["input"]["address"] == f"127.0.0.1:{sender.port}"
            assert info["source"] == f"ndi:127.0.0.1:{sender.port}"
            recording = c.post(f"/api/v1/sessions/{sid}/recording/start", json={"include_input": True})
            assert recording.status_code == 201
            (out,) = info["sinks"]
            assert out["id"] == "ndi:wanstream-test-out" and out["state"] == "running" and out["port"]

            # A stalled sink beside the NDI one: it drops its own frames, NDI keeps flowing.
            stalled = _Stalled()
            session.sinks[stalled.id] = stalled
            stalled.start(session.worker.epoch, session.worker.output_rate)
            session.worker.add_sink(stalled)

            # Out: what the engine made comes out of wanstream's NDI source, by direct address.
            received = list(_receive(ndi, f"127.0.0.1:{out['port']}", 8))
            assert all(f.shape == (128, 128, 3) for f in received)
            with capture.lock:
                made = list(capture.frames)
            # The demo model's frames are noise-like, which NDI's compression (4:2:2) blurs: a received frame
            # is far closer to one generated frame than generated frames are to each other.
            for image in received:
                errors = sorted(np.abs(image.astype(np.int16) - m.astype(np.int16)).mean() for m in made)
                assert errors[0] < 0.5 * errors[len(errors) // 2], (
                    f"an NDI frame matches no generated frame {errors}"
                )

            _wait(lambda: _dropped(c, "stalled") >= 4, what="the stalled sink to drop frames")
            before = c.get(f"/api/v1/sessions/{sid}/sinks").json()
            written = {s["id"]: s["written"] for s in before}
            _wait(
                lambda: (
                    next(
                        s["written"]
                        for s in c.get(f"/api/v1/sessions/{sid}/sinks").json()
                        if s["id"] == out["id"]
                    )
                    >= written[out["id"]] + 8
                ),
                what="the NDI sink to keep writing beside the stalled one",
            )
            stalled_now = next(
                s for s in c.get(f"/api/v1/sessions/{sid}/sinks").json() if s["id"] == "stalled"
            )
            assert stalled_now["written"] == 0 and stalled_now["dropped"] >= 4 and stalled_now["queue"] <= 4
            stalled.gate.set()
            assert c.delete(f"/api/v1/sessions/{sid}/sinks/stalled").status_code == 204

            # The input recording holds the sender's picture (H.264: within a few levels).
            stopped = c.post(f"/api/v1/sessions/{sid}/recording/stop").json()
            assert stopped["input_frames"] > 0
            data = c.get(f"/api/v1/sessions/{sid}/recording/input.mp4").content
            with av.open(io.BytesIO(data)) as container:
                first = next(container.decode(video=0)).to_ndarray(format="rgb24")
            assert first.shape[:2] == SIZE
            assert np.abs(first.reshape(-1, 3).mean(0) - COLOUR).max() < 12, first.reshape(-1, 3).mean(0)
        finally:
            session.worker.remove_sink(capture)
            c.delete(f"/api/v1/sessions/{sid}")
        assert c.get("/api/v1/sessions").json() == []


def test_serve_ndi_in_with_default_sinks_runs_from_start_up_and_comes_back(ndi_runtime: Any) -> None:
    from wanstream.server import ServerConfig, create_app

    ndi = ndi_runtime
    with _TestSender(ndi) as sender:
        config = ServerConfig(
            demo=True,
            max_sessions=2,
            ndi_discovery=False,
            ndi_in=f"127.0.0.1:{sender.port}",
            sinks=("ndi:auto-out", "ts"),
            max_chunk_s=20.0,
            settings_overrides={"height": 128, "width": 128},
        )
        with InProcessServer(create_app(config)) as server, server.client() as c:
            _wait(lambda: len(c.get("/api/v1/sessions").json()) == 1, what="the --ndi-in session")
            (first,) = c.get("/api/v1/sessions").json()
            sid = first["session_id"]
            assert first["kind"] == "headless" and first["source"] == f"ndi:127.0.0.1:{sender.port}"
            _wait(lambda: c.get(f"/api/v1/sessions/{sid}").json()["input"]["frames"] >= 5, what="NDI input")
            sinks = c.get(f"/api/v1/sessions/{sid}/sinks").json()
            assert [s["id"] for s in sinks] == ["ndi:auto-out", "ts"]
            received = list(_receive(ndi, f"127.0.0.1:{sinks[0]['port']}", 3))
            assert all(f.shape == (128, 128, 3) for f in received)

            # Discovery is off: nothing is browsed, and a source by name is refused with the reason.
            listing = c.get("/api/v1/ndi/sources")
            assert listing.status_code == 503 and "discovery is off" in listing.json()["detail"]
            by_name = c.post("/api/v1/sessions", json={"source": "ndi", "ndi": {"name": "PC (cam)"}})
            assert by_name.status_code == 422 and "give the source's address" in by_name.json()["detail"]

            # The server's own session comes back after it ends.
            assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204
            _wait(
                lambda: [s["session_id"] for s in c.get("/api/v1/sessions").json()] not in ([], [sid]),
                what="the --ndi-in session to start again",
            )
