"""The server's building blocks on their own: security rules, input sampling, pacing queue, recording."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from wanstream.engine.measure import percentile
from wanstream.server.frames import OutputFrame
from wanstream.server.recording import Recorder, encode_jpeg
from wanstream.server.schemas import Control
from wanstream.server.security import (
    RequestGuard,
    SecurityError,
    check_bind,
    is_loopback,
    resolve_media_path,
    sniff_video,
)
from wanstream.server.tracks import PacedOutputTrack
from wanstream.server.worker import (
    FrameConverter,
    InputBuffer,
    RateMeter,
    Window,
    center_crop,
    missing_codec,
    uniform_indices,
)

# ----------------------------------------------------------------------------------------------------
# Binding, tokens, origins


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.0.2", "example.com", ""):
        assert not is_loopback(host), host


def test_non_local_bind_needs_a_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "long-enough-token")
    with pytest.raises(SecurityError, match="without a token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(SecurityError, match="too short"):
        check_bind("127.0.0.1", "abc")


def _guarded(token: str | None, host: str = "127.0.0.1", origins: tuple[str, ...] = ()) -> RequestGuard:
    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    app = Starlette(routes=[Route("/x", ok, methods=["GET", "POST"]), WebSocketRoute("/ws", echo)])
    return RequestGuard(app, token=token, bind_host=host, cors_origins=origins)


def test_guard_checks_the_token_everywhere() -> None:
    app = _guarded("the-right-token", host="0.0.0.0")
    with TestClient(app, base_url="http://10.0.0.5:8000") as c:
        assert c.get("/x").status_code == 401
        assert c.get("/x", headers={"Authorization": "Bearer nope-nope-nope"}).status_code == 401
        assert c.get("/x", headers={"Authorization": "Bearer the-right-token"}).text == "ok"
        assert c.get("/x", headers={"X-Wanstream-Token": "the-right-token"}).text == "ok"
        response = c.get("/x?token=the-right-token")
        assert response.text == "ok" and "HttpOnly" in response.headers["set-cookie"]
        assert c.get("/x").text == "ok"  # the cookie it set
        c.cookies.clear()
        with pytest.raises(WebSocketDisconnect) as refused, c.websocket_connect("/ws"):
            pass
        assert refused.value.code == 1008
        with c.websocket_connect("/ws", headers={"Authorization": "Bearer the-right-token"}) as ws:
            assert ws.receive_text() == "hello"


def test_guard_refuses_other_origins_and_rebound_hosts() -> None:
    app = _guarded(None, origins=("http://studio.example",))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/x").text == "ok"
        assert c.post("/x", headers={"Origin": "http://evil.example"}).status_code == 403
        assert c.post("/x", headers={"Origin": "http://studio.example"}).status_code == 200
        assert c.post("/x", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200  # same origin
        assert c.get("/x", headers={"Host": "attacker.example"}).status_code == 403  # DNS rebinding
        assert c.get("/x", headers={"Host": "localhost:8000"}).status_code == 200


# ----------------------------------------------------------------------------------------------------
# Paths and uploads


def test_media_paths_stay_inside_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "media"
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "a.mp4").write_bytes(b"x")
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (root / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    assert resolve_media_path(root, "clips/a.mp4") == (root / "clips" / "a.mp4").resolve()
    assert resolve_media_path(root, "new name.mp4") == (root / "new name.mp4").resolve()
    bad = ["../outside.mp4", "clips/../../outside.mp4", "/etc/passwd", "..", ".", "", ".hidden.mp4",
           "clips/.git/x.mp4", "a\\..\\b.mp4", "a\x00b.mp4", "C:/x.mp4", "link.mp4", "~/x.mp4"]  # fmt: skip
    for name in bad:
        with pytest.raises(SecurityError):
            resolve_media_path(root, name)
    with pytest.raises(SecurityError, match="--media-dir"):
        resolve_media_path(None, "a.mp4")


def test_container_sniffing() -> None:
    assert sniff_video(b"\x00\x00\x00\x18ftypisom\x00\x00") == "mp4"
    assert sniff_video(b"\x1a\x45\xdf\xa3\x01\x00\x00\x00\x00\x00\x00\x1f") == "matroska"
    assert sniff_video(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert sniff_video(b"#!/bin/sh\necho hello") is None
    assert sniff_video(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR") is None


# ----------------------------------------------------------------------------------------------------
# Live-update schema


def test_control_messages() -> None:
    m = Control.model_validate(
        {"prompts": ["a", {"text": "b", "weight": 3}], "seed": 5, "transition": {"steps": 2}}
    )
    assert [p.text for p in m.prompts] == ["a", "b"] and m.prompts[1].weight == 3
    update = m.settings_update()
    assert update is not None and update.model_fields_set == {"seed"} and update.seed == 5
    assert Control.model_validate({"reset": True}).settings_update() is None
    for bad in ({"prompts": []}, {"prompts": [" "]}, {"transition": {"steps": 3}}, {"switch": "cut"},
                {"noise_scale": 1.5}, {"bogus": 1}, {"prompts": ["x"] * 9}):  # fmt: skip
        with pytest.raises(ValidationError):
            Control.model_validate(bad)


def test_settings_that_need_an_autoencoder_the_server_lacks() -> None:
    from types import SimpleNamespace

    from wanstream.engine.settings import StreamSettings

    only_tae = SimpleNamespace(wan_vae=None, taehv=object())
    assert missing_codec(only_tae, StreamSettings(encoder="taehv", decoder="taehv")) is None
    problem = missing_codec(only_tae, StreamSettings(encoder="taehv", decoder="wan"))
    assert problem == "the decoder 'wan' is not loaded on this server; use decoder 'taehv'"
    only_wan = SimpleNamespace(wan_vae=object(), taehv=None)
    assert "encoder 'taehv'" in missing_codec(only_wan, StreamSettings(encoder="taehv", decoder="wan"))
    assert (
        missing_codec(only_wan, StreamSettings(mode="text", encoder="taehv", decoder="wan")) is None
    )  # no input


# ----------------------------------------------------------------------------------------------------
# Input: bounded, uniformly sampled


def test_uniform_indices() -> None:
    assert uniform_indices(4, 4) == [0, 1, 2, 3]
    assert uniform_indices(12, 4) == [0, 4, 7, 11]
    assert uniform_indices(30, 5) == [0, 7, 14, 22, 29]
    assert uniform_indices(3, 1) == [2]
    with pytest.raises(ValueError):
        uniform_indices(3, 4)


def test_input_buffer_samples_everything_queued_and_never_blocks() -> None:
    buf = InputBuffer(capacity=16)
    for i in range(12):
        buf.put(torch.full((2, 2, 3), i, dtype=torch.uint8), float(i))
    picked = buf.take(4, timeout=0.1)
    assert picked is not None and [t for _, t in picked] == [0.0, 4.0, 7.0, 11.0]
    assert len(buf) == 0 and buf.sampled_out == 8
    assert buf.take(4, timeout=0.05) is None  # nothing queued: a timeout, not a block
    for i in range(20):  # overflow: the oldest go
        buf.put(torch.zeros(2, 2, 3, dtype=torch.uint8), float(i))
    assert len(buf) == 16 and buf.overflow == 4 and buf.received == 32
    picked = buf.take(5, timeout=0.1)
    assert picked is not None and picked[0][1] == 4.0 and picked[-1][1] == 19.0


def test_decoded_frames_are_converted_off_the_callers_thread_in_order_and_bounded() -> None:
    buf = InputBuffer(capacity=16)
    converter = FrameConverter(buf, capacity=4, name="t")

    def frame(i: int) -> av.VideoFrame:
        return av.VideoFrame.from_ndarray(np.full((16, 32, 3), i * 20, np.uint8), format="rgb24").reformat(
            format="yuv420p"
        )

    # Not started yet: the queue is bounded, the oldest frames go and are counted as input overflow.
    for i in range(6):
        converter.put(frame(i), arrived=float(i))
    assert buf.overflow == 2 and buf.received == 2 and len(buf) == 0
    converter.start()
    try:
        picked = buf.take(4, timeout=30.0)
        assert picked is not None
        assert [t for _, t in picked] == [2.0, 3.0, 4.0, 5.0]  # in arrival order, the newest kept
        for (image, _), i in zip(picked, range(2, 6)):
            assert isinstance(image, np.ndarray) and image.shape == (16, 32, 3)
            assert abs(int(image[8, 16, 0]) - i * 20) <= 4  # the RGB of that frame (YUV round trip)

        class Unconvertible:
            def to_ndarray(self, format: str) -> np.ndarray:
                raise ValueError("no such pixel format")

        converter.put(Unconvertible(), arrived=6.0)  # type: ignore[arg-type]
        converter.put(frame(7), arrived=7.0)
        picked = buf.take(1, timeout=30.0)
        assert picked is not None and picked[0][1] == 7.0  # the bad frame was skipped, the stream went on
    finally:
        converter.stop()


def test_input_buffer_kick_wakes_a_waiting_take() -> None:
    buf = InputBuffer(capacity=8)
    threading.Timer(0.1, buf.kick).start()
    start = time.monotonic()
    assert buf.take(4, timeout=5.0) is None
    assert time.monotonic() - start < 2.0


def test_center_crop_keeps_the_aspect_without_copying() -> None:
    image = torch.zeros(480, 640, 3, dtype=torch.uint8)
    square = center_crop(image, 256, 256)
    assert square.shape == (480, 480, 3) and square.data_ptr() == image[:, 80].data_ptr()
    wide = center_crop(image, 480, 832)
    assert wide.shape[0] == 369 and wide.shape[1] == 640


def test_rate_meter() -> None:
    meter = RateMeter(size=4)
    assert meter.rate() is None
    for k in range(6):
        meter.add(k * 0.5, 4)  # 4 frames every 0.5 s
    assert meter.rate() == pytest.approx(8.0)


# ----------------------------------------------------------------------------------------------------
# Output track: bounded, paced, stale frames never sent


class _FakeWorker:
    epoch = 0

    def __init__(self, rate: float | None) -> None:
        self.rate = rate

    def output_rate(self) -> float | None:
        return self.rate


def _frames(
    n: int, epoch: int = 0, chunk: int = 0, fps: float = 20.0, compute: float = 0.1
) -> list[OutputFrame]:
    """A chunk as it leaves the engine: its input frames arrived 1/fps apart, it took `compute` after the last."""
    image = np.zeros((16, 16, 3), np.uint8)
    made = time.monotonic()
    arrived = [made - compute - (n - 1 - i) / fps for i in range(n)]
    return [OutputFrame(image, epoch, chunk, (("p", 1.0),), arrived[i], made) for i in range(n)]


def test_output_track_paces_flushes_and_bounds() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        track = PacedOutputTrack(_FakeWorker(rate=20.0), loop, capacity=8)  # type: ignore[arg-type]
        track.put(_frames(4))  # inputs 50 ms apart: the first frame is due at once, the last 150 ms later
        start = time.monotonic()
        pts = [(await track.recv()).pts for _ in range(4)]
        took = time.monotonic() - start
        assert 0.1 <= took <= 0.5  # the input's 3 intervals of 1/20 s after the first frame (plus scheduling)
        assert pts == sorted(pts) and len(set(pts)) == 4
        p50 = track.latency.quantile(0.5)
        assert p50 is not None and 0.2 <= p50 <= 0.45  # one steady delay: the chunk's need (0.25 s), not more

        track.put(_frames(12, chunk=1))  # more than fits: the oldest go
        assert track.depth() == 8 and track.dropped_overflow == 4
        track.flush(1)  # a cut: everything queued is stale
        assert track.depth() == 0 and track.dropped_stale == 8
        track.put(_frames(2, epoch=0, chunk=2))  # late frames of the old epoch are refused
        assert track.depth() == 0 and track.dropped_stale == 10
        track.put(_frames(1, epoch=1, chunk=3))
        frame = await track.recv()
        assert frame.width == 16 and track.sent_log[-1] == (1, 3, "p")
        track.stop()

    asyncio.run(run())


# ----------------------------------------------------------------------------------------------------
# Recording and snapshots


def test_recorder_writes_a_real_time_mp4(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    recorder = Recorder(path, name="t")
    start = time.monotonic()
    for i in range(20):  # 20 frames over 2 s (10 fps), odd size
        recorder.put_frame(np.full((33, 47, 3), i * 10, np.uint8), start + i * 0.1)
    assert recorder.close() == path
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
    assert len(frames) == 20 and (frames[0].width, frames[0].height) == (48, 34)
    assert frames[-1].time == pytest.approx(1.9, abs=0.01)
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_recorder_accepts_av_frames_and_drops_when_full(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "in.mp4", name="t", queue_frames=2)
    recorder._queue.put(("not a frame", 0.0))  # a bad item fails the writer, not the caller
    for i in range(50):
        frame = av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, 30)
        recorder.put_frame(frame, i / 30)
    recorder.close()
    assert recorder.dropped > 0
    assert recorder.error is not None and not (tmp_path / "in.mp4").exists()


def test_empty_recording_leaves_no_file(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "none.mp4", name="t")
    assert recorder.close() is None
    assert list(tmp_path.iterdir()) == []


def test_jpeg_snapshot() -> None:
    image = np.random.default_rng(0).integers(0, 40, (64, 96, 3), dtype=np.uint8)  # texture: quality matters
    image[:, :48, 0] = 255
    data = encode_jpeg(image, quality=90)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    with av.open(io.BytesIO(data)) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert decoded.shape == (64, 96, 3)
    assert decoded[:, :40, 0].mean() > 200 and decoded[:, 56:, 0].mean() < 60
    assert len(encode_jpeg(image, quality=5)) < len(data)
    with pytest.raises(ValueError):
        encode_jpeg(image, quality=0)


def test_offer_checks_read_each_video_section() -> None:
    from wanstream.server.signaling import SignalingError, check_offer

    sends = [
        "v=0\nm=video 9 x\na=sendrecv\n",
        "v=0\nm=video 9 x\n",
        "v=0\nm=audio 9 x\na=recvonly\nm=video 9 x\n",
    ]
    for sdp in sends:
        check_offer(sdp, "video")
    receives_only = [
        "v=0\nm=audio 9 x\na=sendrecv\nm=video 9 x\na=recvonly\n",
        "v=0\nm=video 9 x\na=recvonly\nm=audio 9 x\na=sendrecv\n",
        "v=0\na=recvonly\nm=video 9 x\n",  # session-level direction
    ]
    for sdp in receives_only:
        with pytest.raises(SignalingError, match="sends none"):
            check_offer(sdp, "video")
        check_offer(sdp, "text")  # text mode only sends
    with pytest.raises(SignalingError, match="no video section"):
        check_offer("v=0\nm=audio 9 x\n", "text")


def test_chunk_cost_refuses_what_the_device_cannot_serve() -> None:
    from wanstream.engine.settings import StreamSettings
    from wanstream.server.cost import ChunkCost, TooSlow

    cost = ChunkCost(max_chunk_s=2.0, unmeasured_pixels=256 * 256)
    small = StreamSettings(height=128, width=128, steps=(700, 500), encoder="taehv", decoder="taehv")
    cost.check(small)  # unmeasured: up to the unmeasured size
    big = small.model_copy(update={"height": 512, "width": 512})
    with pytest.raises(TooSlow, match="larger than this device has been measured"):
        cost.check(big)
    cost.observe(small, 0.25)  # 128×128, 2 steps: 0.25 s
    assert cost.estimate(small) == pytest.approx(0.25)
    # 16× the pixels: 16 × 0.25 s, × √16 for attention's growth beyond what was measured
    assert cost.estimate(big) == pytest.approx(0.25 * 16 * 4)
    with pytest.raises(TooSlow, match=r"about 16\.0 s per chunk.*limit is 2 s"):
        cost.check(big)
    text = small.model_copy(update={"mode": "text"})
    assert cost.estimate(text) == pytest.approx(0.25)  # bounded by the video stream's cost
    cost.check(small.model_copy(update={"steps": (700,)}))


def test_candidate_filter() -> None:
    from wanstream.server.limits import candidate_problem

    for host in ("127.0.0.1", "::1", "192.168.1.20", "10.0.0.7", "203.0.113.5", "2001:db8::1", "a1b2.local"):
        assert candidate_problem(host, 40000, allow_link_local=False) is None, host
    for host, reason in (
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fd00:ec2::254", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("metadata.google.internal", "not an IP address"),
    ):
        problem = candidate_problem(host, 40000, allow_link_local=False)
        assert problem is not None and reason in problem, (host, problem)
    assert candidate_problem("169.254.10.1", 40000, allow_link_local=True) is None
    assert "port" in (candidate_problem("127.0.0.1", 0, allow_link_local=False) or "")


def test_json_depth_ignores_brackets_in_strings() -> None:
    from wanstream.server.limits import json_depth

    assert json_depth(b"") == 0 and json_depth(b"1") == 0
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"a": "[[[[{{{{"}') == 1
    assert json_depth(b'{"a": "x\\\\", "b": [[1]]}') == 3  # an escaped backslash ends the string
    assert json_depth(b'{"a": "x\\"[[[["}') == 1  # an escaped quote does not
    assert json_depth(b"[" * 100_000) == 100_000


def test_tokens_are_redacted_and_must_be_usable() -> None:
    from wanstream.server.security import SecurityError, check_bind, redact_query

    assert redact_query("GET /health?token=s3cret&x=1") == "GET /health?token=***&x=1"
    assert redact_query("/a?x=1&token=s3cret") == "/a?x=1&token=***"
    for bad in (" " * 8, " leading-space", "tab\tinside-token", "short"):
        with pytest.raises(SecurityError):
            check_bind("0.0.0.0", bad)
    check_bind("0.0.0.0", "abcdefgh")


def test_data_channel_of_a_client_that_never_reads_is_closed() -> None:
    """Replies queue in the data channel while its client reads nothing: past 1 MiB the channel is closed
    (the client sees it close) instead of replies piling up or vanishing."""
    from wanstream.server.signaling import MAX_CHANNEL_BUFFER, _send

    class Channel:
        readyState = "open"
        bufferedAmount = 0
        sent: list[str] = []  # noqa: RUF012
        closed = False

        def send(self, text: str) -> None:
            self.sent.append(text)
            self.bufferedAmount += len(text)

        def close(self) -> None:
            self.closed = True

    channel = Channel()
    _send(channel, {"type": "ack", "id": 1})
    assert len(channel.sent) == 1 and not channel.closed
    channel.bufferedAmount = MAX_CHANNEL_BUFFER + 1
    _send(channel, {"type": "ack", "id": 2})
    assert len(channel.sent) == 1 and channel.closed


def test_vace_reference_images_are_checked_from_their_header(tmp_path: Path) -> None:
    """A reference image placed in the media folder by hand is refused from its header too (413), never
    decoded; a plain corrupt file is a 422 naming the field."""
    import struct
    import zlib

    from wanstream.server.vace import VaceRefused, read_media_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(VaceRefused, match="9000×9000") as refused:
        read_media_image(tmp_path, "bomb.png", "vace.ref_images")
    assert refused.value.status == 413
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(VaceRefused, match=r"vace\.ref_images: 'junk\.png' cannot be read") as junk:
        read_media_image(tmp_path, "junk.png", "vace.ref_images")
    assert junk.value.status == 422


def test_window_percentiles_are_the_projects_one_percentile() -> None:
    """/metrics and the session stats read `Window.quantile`: the same p50 / p90 as `generate --stats-json` and
    `bench --json` (engine.measure.percentile), over the last `size` values only."""
    window = Window(4)
    assert window.quantile(0.9) is None  # nothing measured yet
    for value in (9.0, 4.0, 1.0, 3.0, 2.0):  # the 9 falls out of the window
        window.add(value)
    assert window.quantile(0.5) == 2.5 and window.quantile(0.9) == pytest.approx(3.7)
    assert window.quantile(0.9) == percentile([4.0, 1.0, 3.0, 2.0], 0.9)


def test_a_recording_encodes_the_same_frames_to_the_same_bytes_beside_the_engine(tmp_path: Path) -> None:
    """A bit-exact replay's recording must be the live recording's bytes (the studio draws their difference).
    x264's macroblock-tree rate control broke that while the engine ran between frames: 11 different files of
    25 runs of one job (identical frames in). Here the engine runs between the frames, as in a stream."""
    import hashlib

    from wanstream import Pipeline
    from wanstream.server.recording import Mp4Encoder

    pipe = Pipeline.demo()
    session = pipe.session(height=64, width=96, prompts=["ink"])
    frames = [
        (torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8)
        for i in range(24)
    ]
    digests = set()
    for run in range(6):
        encoder = Mp4Encoder(tmp_path / f"take{run}.mp4")
        for i, frame in enumerate(frames):
            encoder.write(frame, 62 * i)
            if i % 4 == 0:  # a chunk of the engine's work between the frames
                session.push(frame.expand(5 if i == 0 else 4, -1, -1, -1))
        path = encoder.close()
        assert path is not None
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1, f"{len(digests)} different files of 6 encodes of the same frames"
