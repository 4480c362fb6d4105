"""Live MPEG-TS over HTTP: the generated stream as H.264 in a transport stream, for ffplay, VLC and OBS.

One encoder per session (the `ts` sink) writes the stream once; every HTTP client gets the same bytes.
A client joins at the next keyframe (the muxer writes the PAT/PMT tables just before each keyframe, so
a player can start there); a client that cannot keep up skips ahead to the next keyframe, its skipped
bytes counted, instead of slowing the encoder or the other clients. Timestamps are the real times the
frames leave the sink's pacing (90 kHz), so the stream plays at the speed it is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from wanstream.server.io.sinks import QueuedSink, SinkUnavailable, fit_frame

if TYPE_CHECKING:
    from wanstream.server.frames import OutputFrame

TIME_BASE = Fraction(1, 90_000)
H264_ENCODERS = ("libx264", "libopenh264")  # in order of preference; whichever this PyAV has
MAX_CLIENTS = 8  # HTTP clients per session (each holds a queue of encoded units)
CLIENT_BACKLOG = 256  # encoded units (about one per frame) a client may fall behind before it skips
KEYFRAME_S = 1.0  # a keyframe (a point where players can join) at least this often


def h264_encoder() -> str | None:
    """The H.264 encoder this PyAV build has, or None."""
    available = av.codecs_available
    return next((name for name in H264_ENCODERS if name in available), None)


class TsClient:
    """One HTTP client's view of the stream: encoded units queued for it, starting at a keyframe."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._units: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()
        self.joined = False  # has received a keyframe
        self.closed = False
        self.skipped = 0  # units dropped because this client fell behind

    def offer(self, unit: bytes, keyframe: bool) -> None:
        """From the encoder thread: queue a unit (never blocks)."""
        with self._lock:
            if not self.joined:
                if not keyframe:
                    return
                self.joined = True
            if len(self._units) >= CLIENT_BACKLOG:
                self.skipped += len(self._units)
                self._units.clear()
                self.joined = keyframe  # resume at the next keyframe
                if not keyframe:
                    return
            self._units.append(unit)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._arrived.set)

    def end(self) -> None:
        self.closed = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._arrived.set)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            with self._lock:
                batch = b"".join(self._units)
                self._units.clear()
                if not batch:
                    self._arrived.clear()
            if batch:
                yield batch
                continue
            if self.closed:
                return
            await self._arrived.wait()


class MpegTsSink(QueuedSink):
    """H.264 in MPEG-TS, served at `GET /api/v1/sessions/{id}/output.ts` to any number of clients."""

    kind = "ts"

    def __init__(self, name: str | None = None, *, capacity: int = 8, bitrate_kbps: int = 4000) -> None:
        super().__init__(name, capacity=capacity)
        self._clients: list[TsClient] = []
        self._clients_lock = threading.Lock()
        self._container: Any = None
        self._stream: Any = None
        self._pending: list[bytes] = []
        self._start: float | None = None
        self._last_pts = -1
        self._bitrate = bitrate_kbps
        self.encoder = h264_encoder()
        self.bytes_out = 0
        self.served = 0  # clients served so far

    def open(self, height: int, width: int, fps: float) -> None:
        if self.encoder is None:
            raise SinkUnavailable(
                f"this PyAV build has no H.264 encoder (looked for {', '.join(H264_ENCODERS)}); "
                "install the PyAV wheel from PyPI (it bundles libx264)"
            )
        container = av.open(
            _Collector(self._pending), "w", format="mpegts", container_options={"flush_packets": "1"}
        )
        stream = container.add_stream(self.encoder, rate=max(1, round(fps)))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base = TIME_BASE
        stream.bit_rate = self._bitrate * 1000
        gop = str(max(1, round(fps * KEYFRAME_S)))
        if self.encoder == "libx264":  # no B-frames and no lookahead: each frame goes out as it is made
            stream.options = {"preset": "veryfast", "tune": "zerolatency", "g": gop, "keyint_min": gop}
        else:
            stream.options = {"g": gop}
        self._container, self._stream = container, stream

    def write(self, item: OutputFrame) -> None:
        stream = self._stream
        image = np.ascontiguousarray(fit_frame(item.image, stream.height, stream.width))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        now = time.monotonic()
        if self._start is None:
            self._start = now
        pts = max(round((now - self._start) * TIME_BASE.denominator), self._last_pts + 1)
        self._last_pts = pts
        frame.pts, frame.time_base = pts, TIME_BASE
        for packet in stream.encode(frame):
            self._mux(packet)

    def _mux(self, packet: Any) -> None:
        self._pending.clear()
        self._container.mux(packet)
        unit = b"".join(self._pending)
        self._pending.clear()
        if not unit:
            return
        self.bytes_out += len(unit)
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            client.offer(unit, packet.is_keyframe)

    def _fail(self, message: str) -> None:
        super()._fail(message)
        self._end_clients()  # viewers see the stream end rather than wait on a dead encoder

    def _end_clients(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.end()

    def release(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(Exception):
                container.close()
        self._end_clients()

    # -- HTTP clients (event loop) -------------------------------------------------------------------
    def subscribe(self, loop: asyncio.AbstractEventLoop) -> TsClient:
        with self._clients_lock:
            if self.state != "running":
                raise SinkUnavailable(
                    f"the MPEG-TS output is {self.state}" + (f": {self.error}" if self.error else "")
                )
            if len(self._clients) >= MAX_CLIENTS:
                raise SinkUnavailable(f"the MPEG-TS output already serves {MAX_CLIENTS} clients")
            client = TsClient(loop)
            self._clients.append(client)
            self.served += 1
        return client

    def unsubscribe(self, client: TsClient) -> None:
        with self._clients_lock:
            self._clients = [c for c in self._clients if c is not client]

    def describe(self) -> dict[str, Any]:
        with self._clients_lock:
            clients = list(self._clients)
        return {
            "encoder": self.encoder,
            "clients": len(clients),
            "bytes_out": self.bytes_out,
            "client_skipped_units": sum(c.skipped for c in clients),
        }


class _Collector:
    """The muxer's output file: PyAV writes each flushed packet's bytes here."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)
