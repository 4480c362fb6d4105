"""Server-side sinks without a server: bounded per-sink queues, pacing, restarts, the virtual camera
(with pyvirtualcam's camera faked), Spout / Syphon where the OS has none, and what clients may name."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import ValidationError

from wanstream.server.frames import OutputFrame
from wanstream.server.io.sinks import QueuedSink, SinkUnavailable, fit_frame, rgbx
from wanstream.server.io.specs import NdiInput, SinkSpec
from wanstream.server.io.texshare import SpoutSink, SyphonSink
from wanstream.server.io.virtualcam import VirtualCameraSink


def _frames(n: int, epoch: int = 0, size: tuple[int, int] = (16, 24), start: int = 0) -> list[OutputFrame]:
    out = []
    for i in range(start, start + n):
        image = np.full((*size, 3), i % 256, dtype=np.uint8)
        out.append(OutputFrame(image=image, epoch=epoch, chunk=i // 4, prompt=(), source_time=None, made=0.0))
    return out


class _Recording(QueuedSink):
    kind = "recording"

    def __init__(self, capacity: int = 8, gate: threading.Event | None = None) -> None:
        super().__init__(capacity=capacity)
        self.seen: list[int] = []
        self.entered = threading.Event()
        self._gate = gate

    def write(self, frame: OutputFrame) -> None:
        self.entered.set()
        if self._gate is not None:
            self._gate.wait(30)
        self.seen.append(int(frame.image[0, 0, 0]))


def _wait(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_stalled_sink_drops_only_its_own_frames_and_never_blocks_the_stream() -> None:
    gate = threading.Event()
    stalled = _Recording(capacity=4, gate=gate)
    healthy = _Recording(capacity=64)
    for sink in (stalled, healthy):
        sink.start(0, lambda: None)  # no rate yet: frames go out as they come
    try:
        stalled.put(_frames(1))
        _wait(stalled.entered.is_set, what="the stalled sink to take its first frame")
        # The worker hands 40 more frames to both sinks: put returns at once although one sink is stuck.
        for batch in range(10):
            frames = _frames(4, start=1 + batch * 4)
            started = time.monotonic()
            stalled.put(frames)
            healthy.put(frames)
            assert time.monotonic() - started < 1.0
        _wait(lambda: healthy.written == 40, what="the healthy sink to write every frame")
        assert healthy.dropped == 0 and healthy.seen == list(range(1, 41))
        assert stalled.depth() == 4 and stalled.dropped == 36  # its queue kept the newest 4
        gate.set()
        _wait(lambda: stalled.written == 5, what="the stalled sink to catch up")
        assert stalled.seen == [0, 37, 38, 39, 40]
        status = stalled.status()
        assert status["dropped"] == 36 and status["written"] == 5 and status["state"] == "running"
    finally:
        gate.set()
        stalled.close()
        healthy.close()
    assert stalled.state == healthy.state == "stopped"


def test_a_restart_flushes_a_sink_and_older_frames_never_come_out() -> None:
    gate = threading.Event()
    sink = _Recording(capacity=16, gate=gate)
    sink.start(0, lambda: None)
    try:
        sink.put(_frames(1))
        _wait(sink.entered.is_set, what="the first write")
        sink.put(_frames(5, start=1))
        sink.flush(1)  # a reset: the 5 queued frames are stale
        sink.put(_frames(2, epoch=0, start=10))  # late frames of the old epoch
        sink.put(_frames(2, epoch=1, start=20))
        gate.set()
        _wait(lambda: sink.written == 3, what="the new epoch's frames")
        assert sink.seen == [0, 20, 21] and sink.stale == 7
        # A sink added just before a restart it never heard of adopts the newer epoch from the frames.
        sink.put(_frames(1, epoch=3, start=30))
        _wait(lambda: sink.written == 4, what="the adopted epoch")
        assert sink.seen[-1] == 30
    finally:
        gate.set()
        sink.close()


def test_sink_pacing_spreads_a_chunk_at_the_engine_rate() -> None:
    sink = _Recording(capacity=16)
    times: list[float] = []
    original = sink.write

    def timed(frame: OutputFrame) -> None:
        times.append(time.monotonic())
        original(frame)

    sink.write = timed  # type: ignore[method-assign]
    sink.start(0, lambda: 20.0)  # 20 frames per second: 50 ms apart
    try:
        sink.put(_frames(4))
        _wait(lambda: sink.written == 4, what="the chunk")
    finally:
        sink.close()
    gaps = np.diff(times)
    assert gaps.min() >= 0.045, gaps  # never faster than the engine rate (a loaded CPU only makes it later)


def test_a_failing_write_stops_that_sink_with_its_reason_and_counts_later_frames() -> None:
    class Broken(QueuedSink):
        kind = "broken"

        def write(self, frame: OutputFrame) -> None:
            raise OSError("device unplugged")

    sink = Broken()
    sink.start(0, lambda: None)
    try:
        sink.put(_frames(1))
        _wait(lambda: sink.state == "error", what="the failure")
        assert sink.error == "OSError: device unplugged"
        sink.put(_frames(3, start=1))
        assert sink.dropped == 3 and sink.written == 0
    finally:
        sink.close()
    assert sink.state == "error"


def test_fit_frame_and_rgbx() -> None:
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert fit_frame(image, 4, 6) is image
    scaled = fit_frame(image, 8, 12)
    assert scaled.shape == (8, 12, 3) and (scaled[::2, ::2] == image).all()
    out = rgbx(image)
    assert out.shape == (4, 6, 4) and (out[..., :3] == image).all() and (out[..., 3] == 255).all()


# ----------------------------------------------------------------------------------------------------
# Virtual camera, Spout, Syphon


class _FakeCamera:
    instances: ClassVar[list[_FakeCamera]] = []

    def __init__(self, *, width: int, height: int, fps: float, device: str | None) -> None:
        self.width, self.height, self.fps, self.device = width, height, fps, device or "/dev/video9"
        self.sent: list[np.ndarray] = []
        self.closed = False
        _FakeCamera.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        assert frame.shape == (self.height, self.width, 3) and frame.dtype == np.uint8
        assert frame.flags.c_contiguous
        self.sent.append(frame.copy())

    def close(self) -> None:
        self.closed = True


def test_virtual_camera_sink_sends_frames_at_the_size_it_opened_with() -> None:
    sink = VirtualCameraSink(capacity=8, camera=_FakeCamera)
    sink.open(16, 24, 16.0)
    camera = _FakeCamera.instances[-1]
    assert (camera.width, camera.height, camera.fps) == (24, 16, 16.0)
    assert sink.status()["device"] == "/dev/video9"
    sink.start(0, lambda: None)
    try:
        sink.put(_frames(2))
        sink.put(_frames(1, size=(32, 48), start=7))  # the stream's resolution changed live
        _wait(lambda: sink.written == 3, what="three frames on the camera")
    finally:
        sink.close()
    assert camera.closed
    assert [int(f[0, 0, 0]) for f in camera.sent] == [0, 1, 7]
    assert all(f.shape == (16, 24, 3) for f in camera.sent)


def test_virtual_camera_without_a_device_is_a_clear_error() -> None:
    def no_device(**kwargs: Any) -> Any:
        raise RuntimeError("'v4l2loopback' backend: No v4l2 loopback device found at /dev/video[0-99].")

    sink = VirtualCameraSink(camera=no_device)
    with pytest.raises(SinkUnavailable, match=r"virtual camera could not open: .*No v4l2 loopback device"):
        sink.open(16, 16, 16.0)


@pytest.mark.skipif(sys.platform != "linux", reason="checks this Linux machine's missing v4l2loopback device")
def test_the_real_pyvirtualcam_says_what_to_load_when_no_device_exists() -> None:
    pytest.importorskip("pyvirtualcam")
    from wanstream.server.io.virtualcam import _loopback_devices, availability

    if _loopback_devices():
        pytest.skip("this machine has a v4l2loopback device")
    ok, reason = availability()
    assert not ok and "modprobe v4l2loopback" in reason
    with pytest.raises(SinkUnavailable, match="modprobe v4l2loopback"):
        VirtualCameraSink().open(16, 16, 16.0)


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="Spout / Syphon exist on this OS")
def test_spout_and_syphon_report_why_they_are_unavailable() -> None:
    with pytest.raises(SinkUnavailable, match="Spout is Windows-only"):
        SpoutSink("x").open(16, 16, 16.0)
    with pytest.raises(SinkUnavailable, match="Syphon is macOS-only"):
        SyphonSink("x").open(16, 16, 16.0)


# ----------------------------------------------------------------------------------------------------
# What clients name


def test_sink_specs_from_flags_and_bodies() -> None:
    assert SinkSpec.parse("ts").id == "ts"
    assert SinkSpec.parse("ndi").id == "ndi:wanstream"
    assert SinkSpec.parse("ndi:Stage Left").id == "ndi:Stage Left"
    assert SinkSpec.parse("virtualcam:/dev/video4").name == "/dev/video4"
    for bad in ("rtmp:x", "ndi:" + "x" * 65, "ndi:a\nb"):
        with pytest.raises(ValidationError):
            SinkSpec.parse(bad)
    with pytest.raises(ValidationError):
        SinkSpec.model_validate({"kind": "ts", "queue": 0})
    with pytest.raises(ValidationError):
        SinkSpec.model_validate({"kind": "ts", "url": "x"})  # unknown fields are refused


def test_ndi_inputs_by_name_or_address() -> None:
    assert NdiInput.parse("127.0.0.1:5961").address == "127.0.0.1:5961"
    assert NdiInput.parse("[::1]:5961").address == "[::1]:5961"
    assert NdiInput.parse("STUDIO-PC (OBS)").name == "STUDIO-PC (OBS)"
    assert NdiInput.parse("STUDIO-PC (OBS)").label == "ndi:STUDIO-PC (OBS)"
    with pytest.raises(ValidationError, match="needs 'name'"):
        NdiInput.model_validate({})
    for bad in ("localhost", "127.0.0.1:0", "127.0.0.1:70000", ":5961"):
        with pytest.raises(ValidationError, match="HOST:PORT"):
            NdiInput(address=bad)


# ----------------------------------------------------------------------------------------------------
# MPEG-TS viewers


def test_a_ts_viewer_joins_at_a_keyframe_and_a_slow_one_skips_ahead_to_the_next() -> None:
    import asyncio

    from wanstream.server.io.mpegts import CLIENT_BACKLOG, TsClient

    async def run() -> None:
        client = TsClient(asyncio.get_running_loop())
        client.offer(b"p0", keyframe=False)  # before any keyframe: a player could not start here
        client.offer(b"K1", keyframe=True)
        client.offer(b"p1", keyframe=False)
        chunks = client.chunks()
        assert await anext(chunks) == b"K1p1"
        # A viewer that stops reading: the encoder never waits; past the backlog its queue is dropped and it
        # resumes at the next keyframe.
        for i in range(CLIENT_BACKLOG + 3):
            client.offer(b"x%d" % i, keyframe=False)
        assert client.skipped == CLIENT_BACKLOG and not client.joined
        client.offer(b"K2", keyframe=True)
        client.offer(b"p2", keyframe=False)
        client.end()
        assert [c async for c in chunks] == [b"K2p2"]

    asyncio.run(run())


# ----------------------------------------------------------------------------------------------------
# The NDI runtime's discovery setting


class _FakeNdi:
    def __init__(self) -> None:
        self.started = 0

    def initialize(self) -> bool:
        self.started += 1
        return True


def test_ndi_discovery_off_writes_a_loopback_only_config_and_a_runtime_started_otherwise_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json
    import os
    from pathlib import Path

    from wanstream.server.io import ndi

    fake = _FakeNdi()
    monkeypatch.setattr(ndi, "module", lambda: fake)
    monkeypatch.setattr(ndi, "_state", {"discovery": True, "started_with": None, "config_dir": None})
    monkeypatch.setenv("NDI_CONFIG_DIR", "")  # recorded, so the value runtime() sets is undone after the test
    monkeypatch.delenv("NDI_CONFIG_DIR")
    ndi.configure(discovery=False)
    assert ndi.runtime() is fake and ndi.runtime() is fake and fake.started == 1
    config = json.loads((Path(os.environ["NDI_CONFIG_DIR"]) / "ndi-config.v1.json").read_text())
    assert config["ndi"]["networks"]["discovery"] == "127.0.0.1"  # a discovery server on loopback: no mDNS
    assert config["ndi"]["multicast"]["send"]["enable"] is False
    ndi.configure(discovery=True)  # another app in the same process asks for discovery
    with pytest.raises(SinkUnavailable, match="started with discovery off; restart the server"):
        ndi.runtime()
    ndi.configure(discovery=False)
    with pytest.raises(SinkUnavailable, match="discovery is off"):
        ndi.discover(0.1)
    with pytest.raises(ValueError, match="give the source's address"):
        ndi.NdiSource(lambda image, at: None, name="PC (cam)")
