"""Soak: the server under steady use and steady abuse, for `WANSTREAM_SOAK_S` seconds (CI: 60).

One headless text stream at the demo's real-time size (256×256) with a prompt change every second; 10
WebRTC clients (loopback) joining and leaving, taking whatever slots are free (409 when none is); and
the attacks of issue 18 interleaved: a 10 MB prompt, deeply nested JSON, an image bomb, malformed
timelines, `{"seed": true}`, a 4096×4096 stream, a binary WebSocket frame and a reply flood, an offer
with a link-local candidate, half-open HTTP connections, and streams deleted mid-chunk.

Checks: every answer is the expected one; `/health` answers within 1 s throughout; after the churn the
server's threads and open files are back to the baseline taken after a warm-up pass, its RSS is within
a plateau of it and does not trend up over the second half of the run (the bounds are below). The full run (30 minutes) is recorded in docs/reliability.md:

    WANSTREAM_SOAK_S=1800 WANSTREAM_SOAK_REPORT=soak.json pytest tests/server/test_soak.py -s
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from aiortc import RTCSessionDescription

from server.harness import ServerProcess, describe
from server.rtc_client import RtcClient

SOAK_S = float(os.environ.get("WANSTREAM_SOAK_S", "60"))
REPORT = os.environ.get("WANSTREAM_SOAK_REPORT")
CLIENTS = 10
# RSS, in two bounds. Plateau: the quiet RSS after the churn is within RSS_PLATEAU_MIB of the quiet RSS
# after the warm-up: glibc keeps the native buffers of up to 4 concurrent streams (codecs, DTLS, frames)
# for reuse; the 30-minute run settled at +73 MiB within 5 minutes. Trend: over the second half of the
# run RSS does not rise (median of the last quarter of samples vs the second quarter, RSS_TREND_MIB);
# the 0.1 MiB per session would be +200 MiB over the ~2,000 sessions of 30 minutes.
RSS_PLATEAU_MIB = 128
RSS_TREND_MIB = 32
TREND_AFTER_S = 600  # the trend is checked on runs of 10 minutes or more (the plateau takes about 5)
HEALTH_LIMIT_S = 1.0
WARMUP_S = 10.0
PROMPTS = ["a watercolour harbour at dawn", "a neon city in the rain", "a forest of glass trees"]


def _png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 16000, 16000, 8, 2, 0, 0, 0)
    rows = zlib.compress(bytes(16 * (16000 * 3 + 1)), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


HEALTH_POLLER = """
import sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=10) as c:
    while True:
        start = time.monotonic()
        try:
            status = c.get("/health").status_code
        except httpx.HTTPError as exc:
            status = repr(exc)
        print(round(time.monotonic() - start, 4), status, flush=True)
        time.sleep(0.25)
"""


class HealthWatch:
    """Polls /health four times a second from its own process (so the test's clients, which share this
    process's interpreter lock, never add to the latencies it measures); keeps every latency."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HEALTH_POLLER, url], stdout=subprocess.PIPE, text=True
        )
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._reader = threading.Thread(target=self._read, name="health-watch", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            latency, status = line.split(maxsplit=1)
            self.latencies.append(float(latency))
            if status.strip() != "200":
                self.failures.append(status.strip())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(10)


class Soak:
    def __init__(self, http: httpx.AsyncClient, url: str, headless_id: str) -> None:
        self.http = http
        self.url = url
        self.headless_id = headless_id
        self.counts: dict[str, int] = {}
        self.half_open: list[socket.socket] = []

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # -- steady use ----------------------------------------------------------------------------------
    async def prompt_changes(self, until: float) -> None:
        i = 0
        while time.monotonic() < until:
            i += 1
            body = {"id": i, "prompts": [PROMPTS[i % len(PROMPTS)]]}
            response = await self.http.post(f"/api/v1/sessions/{self.headless_id}/control", json=body)
            assert response.status_code == 200, response.text
            self.count("prompt_change")
            await asyncio.sleep(1.0)

    async def client(self, until: float, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            client = RtcClient(self.http)
            try:
                response = await client.offer(settings={"mode": "text", "height": 64, "width": 64})
                if response.status_code == 409:
                    self.count("client_busy")
                    await asyncio.sleep(rng.uniform(1.0, 3.0))
                    continue
                assert response.status_code == 200, response.text
                answer = response.json()
                client.session_id = answer["session_id"]
                await client.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
                await client.wait_frames(1, timeout=60)
                self.count("client_session")
                await asyncio.sleep(rng.uniform(0.5, 2.0))
            finally:
                await client.close()

    # -- abuse ---------------------------------------------------------------------------------------
    async def attacks(self, until: float) -> None:
        attacks = [
            self.huge_prompt,
            self.deep_json,
            self.image_bomb,
            self.bad_timeline,
            self.bool_seed,
            self.huge_resolution,
            self.websocket_abuse,
            self.link_local_offer,
            self.half_open_connection,
            self.delete_mid_chunk,
        ]
        i = 0
        while True:
            await attacks[i % len(attacks)]()
            i += 1
            if time.monotonic() >= until and i >= len(attacks):
                return
            await asyncio.sleep(0.5)

    async def _expect(self, what: str, response: httpx.Response, status: int) -> None:
        assert response.status_code == status, (what, response.status_code, response.text[:300])
        self.count(what)

    async def huge_prompt(self) -> None:
        raw = json.dumps({"prompts": ["x" * 10_000_000]}).encode()
        url = f"/api/v1/sessions/{self.headless_id}/control"
        headers = {"content-type": "application/json"}
        await self._expect("huge_prompt", await self.http.post(url, content=raw, headers=headers), 413)

    async def deep_json(self) -> None:
        raw = b"[" * 200_000
        await self._expect("deep_json", await self.http.post("/api/v1/timeline/parse", content=raw), 422)

    async def image_bomb(self) -> None:
        headers = {"content-type": "image/png"}
        response = await self.http.put("/api/v1/media/bomb.png", content=_png_bomb(), headers=headers)
        await self._expect("image_bomb", response, 413)

    async def bad_timeline(self) -> None:
        body = {
            "segments": [{"start": 0, "end": 1, "prompts": [{"text": "a"}]}],
            "settings": {"loras": ["a"]},
        }
        await self._expect("bad_timeline", await self.http.post("/api/v1/timeline/export", json=body), 422)

    async def bool_seed(self) -> None:
        url = f"/api/v1/sessions/{self.headless_id}/control"
        await self._expect("bool_seed", await self.http.post(url, json={"seed": True}), 422)

    async def huge_resolution(self) -> None:
        body = {"source": "text", "settings": {"height": 4096, "width": 4096}}
        await self._expect("huge_resolution", await self.http.post("/api/v1/sessions", json=body), 422)

    async def websocket_abuse(self) -> None:
        ws_url = self.url.replace("http", "ws") + f"/api/v1/sessions/{self.headless_id}/ws"
        async with websockets.connect(ws_url) as ws:
            await ws.send(b"\x00binary")
            for i in range(40):
                await ws.send(json.dumps({"id": i, "noise_scale": 7}))
            replies = 0
            while replies < 41:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                replies += message["type"] == "error"
        self.count("websocket_abuse")

    async def link_local_offer(self) -> None:
        sdp = (
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
            "a=recvonly\r\na=candidate:1 1 udp 2122260223 169.254.169.254 80 typ host\r\n"
        )
        body = {"sdp": sdp, "type": "offer", "settings": {"mode": "text"}}
        await self._expect("link_local_offer", await self.http.post("/api/v1/webrtc/offer", json=body), 400)

    async def half_open_connection(self) -> None:
        raw = socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])))
        raw.sendall(b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        self.half_open.append(raw)  # left open: the server closes it (--header-timeout)
        while len(self.half_open) > 20:
            self.half_open.pop(0).close()
        self.count("half_open")

    async def delete_mid_chunk(self) -> None:
        body = {"source": "text", "settings": {"height": 128, "width": 128}}
        response = await self.http.post("/api/v1/sessions", json=body)
        if response.status_code == 409:
            self.count("delete_mid_chunk_busy")
            return
        assert response.status_code == 201, response.text
        sid = response.json()["session_id"]
        await asyncio.sleep(random.uniform(0.0, 1.0))
        assert (await self.http.delete(f"/api/v1/sessions/{sid}")).status_code == 204
        self.count("delete_mid_chunk")

    async def run(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            self.prompt_changes(until),
            self.attacks(until),
            *(self.client(until, seed) for seed in range(CLIENTS)),
        )


async def _settle(http: httpx.AsyncClient, sessions: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len((await http.get("/api/v1/sessions")).json()) != sessions:
        assert time.monotonic() < deadline, (await http.get("/api/v1/sessions")).json()
        await asyncio.sleep(0.1)


@pytest.mark.slow
def test_soak(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    server = ServerProcess(
        "--demo",
        "--max-sessions",
        "4",
        "--media-dir",
        str(media),
        "--max-upload-mb",
        "1",
        "--ice-timeout",
        "10",
        "--header-timeout",
        "2",
        # the tests' CPU is shared and loaded: only 4096×4096 (minutes per chunk) must be refused here
        "--max-chunk-seconds",
        "20",
        log_path=tmp_path / "server.log",
    )
    samples: list[dict[str, Any]] = []
    health: HealthWatch | None = None
    try:
        server.wait_ready()
        health = HealthWatch(server.url)

        async def main() -> tuple[dict[str, Any], dict[str, Any], Soak]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                body = {"source": "text", "prompts": [PROMPTS[0]], "settings": {"height": 256, "width": 256}}
                response = await http.post("/api/v1/sessions", json=body)
                assert response.status_code == 201, response.text
                soak = Soak(http, server.url, response.json()["session_id"])
                await soak.run(WARMUP_S)  # a pass of everything first (codecs, executor threads, caches)
                await _settle(http, 1)
                await asyncio.sleep(3)  # half-open connections of the warm-up time out (2 s)
                before = _ok_json(await http.get("/api/v1/debug/resources"))

                async def sample() -> None:
                    while True:
                        r = _ok_json(await http.get("/api/v1/debug/resources"))
                        samples.append({"t": time.monotonic(), **r})
                        await asyncio.sleep(5)

                sampler = asyncio.create_task(sample())
                await soak.run(SOAK_S)
                sampler.cancel()
                for raw in soak.half_open:
                    raw.close()
                await _settle(http, 1)
                await asyncio.sleep(3)
                # Sockets of the last clients may still be closing: a leak stays, a socket in close goes.
                deadline = time.monotonic() + 15
                while True:
                    after = _ok_json(await http.get("/api/v1/debug/resources"))
                    settled = (
                        after["open_fds"] <= before["open_fds"] and after["threads"] <= before["threads"]
                    )
                    if settled or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                status = (await http.get(f"/api/v1/sessions/{soak.headless_id}")).json()
                assert status["stats"]["state"] == "running" and status["stats"]["chunks"] > 0
                await http.delete(f"/api/v1/sessions/{soak.headless_id}")
                return before, after, soak

        started = time.monotonic()
        before, after, soak = asyncio.run(main())
        elapsed = time.monotonic() - started
    finally:
        if health is not None:
            health.stop()
        code = server.stop()
    assert code == 0, server.log()
    rss = [s["rss_bytes"] / 2**20 for s in samples]
    summary = {
        "soak_s": SOAK_S,
        "elapsed_s": round(elapsed, 1),
        "counts": soak.counts,
        "health_polls": len(health.latencies),
        "health_p50_s": round(statistics.median(health.latencies), 4),
        "health_max_s": round(max(health.latencies), 4),
        "before": describe(before),
        "after": describe(after),
        "rss_mib_during": [round(x) for x in rss],
        "threads_during": [s["threads"] for s in samples],
        "fds_during": [s["open_fds"] for s in samples],
    }
    print("\nsoak:", json.dumps(summary, indent=1))
    if REPORT:
        Path(REPORT).write_text(json.dumps(summary, indent=1))
    assert health.failures == [], health.failures[:5]
    assert max(health.latencies) < HEALTH_LIMIT_S, max(health.latencies)
    assert soak.counts.get("client_session", 0) >= CLIENTS  # every client got in at least about once
    assert after["threads"] <= before["threads"], (before, after)
    assert after["open_fds"] <= before["open_fds"], (before, after)
    assert (after["rss_bytes"] - before["rss_bytes"]) / 2**20 <= RSS_PLATEAU_MIB, (
        describe(before),
        describe(after),
    )
    if SOAK_S >= TREND_AFTER_S:  # shorter runs end while the allocator is still filling its plateau
        quarter = len(rss) // 4
        trend = statistics.median(rss[3 * quarter :]) - statistics.median(rss[quarter : 2 * quarter])
        print(f"RSS trend over the second half: {trend:+.0f} MiB")
        assert trend <= RSS_TREND_MIB, rss


def _ok_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200
    return response.json()
