"""A loopback WebRTC client for the server tests: a synthetic camera in, the generated stream out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from fractions import Fraction
from typing import Any

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack


class SyntheticCamera(MediaStreamTrack):
    """`fps` frames per second of a moving gradient, each stamped with its frame number in the corner."""

    kind = "video"

    def __init__(self, fps: float = 30.0, height: int = 240, width: int = 320) -> None:
        super().__init__()
        self.fps, self.height, self.width = fps, height, width
        self.sent = 0
        self._start: float | None = None
        y, x = np.mgrid[0:height, 0:width]
        self._base = np.stack(
            [x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1
        )

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        image = ((self._base + self.sent * 7) % 256).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = round(self.sent * 90_000 / self.fps)
        frame.time_base = Fraction(1, 90_000)
        self.sent += 1
        return frame


class RtcClient:
    """Connects to `POST /api/v1/webrtc/offer`, sends a synthetic camera, records what comes back."""

    def __init__(self, http: httpx.AsyncClient, *, camera: SyntheticCamera | None = None) -> None:
        self.http = http
        self.camera = camera
        self.pc = RTCPeerConnection()
        self.frames: list[tuple[float, int, int]] = []  # (arrival, width, height)
        self.replies: list[dict[str, Any]] = []
        self.session_id: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reply_event = asyncio.Event()
        if camera is not None:
            self.pc.addTrack(camera)
        else:
            self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("parameters")
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    def _on_message(self, raw: str) -> None:
        self.replies.append(json.loads(raw))
        self._reply_event.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                self.frames.append((time.monotonic(), frame.width, frame.height))

        self._reader = asyncio.ensure_future(read())

    async def offer(self, **body: Any) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return await self.http.post(
            "/api/v1/webrtc/offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer", **body}
        )

    async def connect(self, timeout: float = 20.0, **body: Any) -> str:
        response = await self.offer(**body)
        assert response.status_code == 200, response.text
        answer = response.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        self.session_id = answer["session_id"]
        deadline = time.monotonic() + timeout
        while self.pc.connectionState != "connected" or self.channel.readyState != "open":
            assert time.monotonic() < deadline, f"not connected: {self.pc.connectionState}"
            await asyncio.sleep(0.02)
        return self.session_id

    async def wait_frames(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            assert time.monotonic() < deadline, f"only {len(self.frames)} of {count} frames arrived"
            await asyncio.sleep(0.02)

    async def send(self, message: dict[str, Any] | str, timeout: float = 15.0) -> dict[str, Any]:
        """Send one update on the data channel and wait for the reply to it (matched by `id`)."""
        raw = message if isinstance(message, str) else json.dumps(message)
        key = message.get("id") if isinstance(message, dict) else None
        seen = len(self.replies)
        self.channel.send(raw)
        deadline = time.monotonic() + timeout
        while True:
            for reply in self.replies[seen:]:
                if key is None or reply.get("id") == key:
                    return reply
            left = deadline - time.monotonic()
            assert left > 0, f"no reply to {raw[:80]}"
            self._reply_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reply_event.wait(), left)

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class BackgroundClient:
    """A healthy stream kept running on its own thread and event loop while other tests poke the server."""

    def __init__(self, base_url: str, headers: dict[str, str], **connect: Any) -> None:
        import threading

        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.client: RtcClient | None = None
        self._thread = threading.Thread(
            target=self._run, args=(base_url, headers, connect), name="healthy-client", daemon=True
        )
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        assert self.client is not None, "the background client did not connect"

    def _run(self, base_url: str, headers: dict[str, str], connect: dict[str, Any]) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
                client = RtcClient(http, camera=SyntheticCamera(fps=15, height=120, width=160))
                try:
                    await client.connect(**connect)
                    await client.wait_frames(1)
                except BaseException as exc:
                    self._error = exc
                    self._ready.set()
                    await client.close()
                    return
                self.client = client
                self._ready.set()
                await self._stop.wait()
                await client.close()

        self._loop.run_until_complete(main())
        self._loop.close()

    @property
    def session_id(self) -> str:
        assert self.client is not None and self.client.session_id is not None
        return self.client.session_id

    def frame_count(self) -> int:
        assert self.client is not None
        return len(self.client.frames)

    def still_streaming(self, more: int = 4, timeout: float = 30.0) -> bool:
        """True when `more` new frames arrive within `timeout` (the stream survived whatever happened)."""
        start = self.frame_count()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.frame_count() >= start + more and self.client.pc.connectionState == "connected":
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
