"""The live path, measured: what a user of `wanstream serve` gets, against `bench` for the same settings.

Starts `wanstream serve` (full-size `--random-weights` on a GPU; `--demo` for a CPU smoke run) as a subprocess
on 127.0.0.1, connects an aiortc client that sends a camera-like stream (a moving pattern, default 30 FPS at
480x832), receives the generated track, and for each step count (one WebRTC session each, warmed up first)
reports:

* delivered FPS (frames received by the client per second of the measurement window) and the input FPS;
* dropped frames: sent − received in the window, and the server's own counts by reason (sampled: the model
  is slower than the source; input/output overflow; stale);
* the server's input → output latency p50/p90 (input frame arrival at the server → generated frame handed to
  the WebRTC encoder; the server's rolling window of its last 256 frames, read at the end of the window),
  the engine's chunk time p50/p90, and latency p90 in chunk times (target: ≤ 2), both as the engine's compute
  per chunk and as a chunk's worth of input at the input rate (4 frames / input FPS);
* `bench`'s FPS for the same settings (run after the server has stopped: one GPU process at a time), and
  delivered / bench (target: ≥ 0.9).

Random weights turn any input into noise, so a frame cannot be tagged through the network; the latency is the
server's per-frame timestamps (input arrival → output), not a client-side stopwatch. Loopback adds no network.

    source tools/gpu/env.sh   # the GPU machine: carried wheels (aiortc, av, ...)
    python3 tools/gpu/live_path.py --out $OUT/live_path.json                      # 480x832, 1-4 steps, Wan VAE
    python3 tools/gpu/live_path.py --out $OUT/live_low.json --serve-arg=--low-vram --codecs taehv
    python3 tools/gpu/live_path.py --demo --device cpu --height 64 --width 64 --steps 1 --warm-s 2 \\
        --measure-s 3 --bench-arg=--tiny --out /tmp/live.json                     # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

STEP_LISTS = {1: [700], 2: [700, 500], 3: [700, 500, 400], 4: [700, 500, 400, 200]}  # as bench runs them
FRAMES_PER_CHUNK = 4  # input frames per chunk after a stream's first (StreamSession.chunk_frames)
CODECS = {"wan": ("wan", "wan"), "taehv": ("taehv", "taehv"), "fast": ("wan", "taehv")}
PROMPT = "a watercolor painting of a city street at night, neon reflections in the rain"


class Camera(MediaStreamTrack):
    """A camera-like source: `fps` frames a second of diagonal stripes and a bright square, both moving."""

    kind = "video"

    def __init__(self, fps: float, height: int, width: int) -> None:
        super().__init__()
        self.fps, self.height, self.width = fps, height, width
        self.sent = 0
        self._start: float | None = None
        y, x = np.mgrid[0:height, 0:width]
        self._stripes = np.stack(
            [(x + y) % 64 * 4, (x - y) % 96 * 2, x * 255 // max(1, width - 1)], -1
        ).astype(np.uint8)

    def image(self, i: int) -> np.ndarray:
        frame = np.roll(self._stripes, 3 * i, axis=1)
        size = max(4, min(self.height, self.width) // 6)
        top = (self.height - size) // 2 + int((self.height // 4) * math.sin(i / 15))
        left = (5 * i) % max(1, self.width - size)
        frame[top : top + size, left : left + size] = 255
        return frame

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self.sent / self.fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = av.VideoFrame.from_ndarray(self.image(self.sent), format="rgb24")
        frame.pts = round(self.sent * 90_000 / self.fps)
        frame.time_base = Fraction(1, 90_000)
        self.sent += 1
        return frame


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`wanstream serve` in a subprocess on 127.0.0.1, its log in `log_path`."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "wanstream.cli.main",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([*cmd, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_loaded(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(f"{self.url}/api/v1/model", timeout=2).json()
                if status["state"] == "loaded":
                    return status
                if status["state"] == "error":
                    raise RuntimeError(f"the model failed to load: {status['error']}\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"the server did not load its model in {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------------------------
# One step count: a WebRTC session, warmed, then measured
# ------------------------------------------------------------------------------------------------
async def measure(url: str, steps: int, opts: argparse.Namespace) -> dict[str, Any]:
    encoder, decoder = CODECS[opts.codecs]
    settings = {
        "height": opts.height,
        "width": opts.width,
        "steps": STEP_LISTS[steps],
        "encoder": encoder,
        "decoder": decoder,
        "batching": opts.batching,
    }
    camera = Camera(opts.fps, opts.height, opts.width)
    pc = RTCPeerConnection()
    pc.addTrack(camera)
    channel = pc.createDataChannel("parameters")
    arrivals: list[float] = []
    readers: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        async def read() -> None:
            while True:
                try:
                    await track.recv()
                except MediaStreamError:
                    return
                arrivals.append(time.monotonic())

        readers.append(asyncio.ensure_future(read()))

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "settings": settings, "prompts": [PROMPT]}
        response = await http.post("/api/v1/webrtc/offer", json=body)
        if response.status_code != 200:
            await pc.close()
            return {"steps": steps, "settings": settings, "error": f"{response.status_code}: {response.text}"}
        answer = response.json()
        sid = answer["session_id"]
        try:
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            await _until(
                lambda: pc.connectionState == "connected" and channel.readyState == "open", 30, "connect"
            )
            first_by = time.monotonic()
            await _until(lambda: bool(arrivals), opts.first_frame_s, "the first frame")
            first_frame_s = arrivals[0] - first_by
            # Compile, graph capture, the codecs' start; the server's first stream compiles the most (cold cache).
            await asyncio.sleep(opts.warm_first_s if steps == opts.steps[0] else opts.warm_s)
            before = (await http.get(f"/api/v1/sessions/{sid}")).json()
            n0, sent0, t0 = len(arrivals), camera.sent, time.monotonic()
            await asyncio.sleep(opts.measure_s)
            after = (await http.get(f"/api/v1/sessions/{sid}")).json()
            n1, sent1, t1 = len(arrivals), camera.sent, time.monotonic()
        finally:
            await pc.close()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            with contextlib.suppress(httpx.HTTPError):
                await http.delete(f"/api/v1/sessions/{sid}")
    window = t1 - t0
    stats, out = after.get("stats", {}), after.get("output", {})
    chunk_p50 = stats.get("chunk_latency_p50")
    latency_p90 = out.get("latency_p90")
    return {
        "steps": steps,
        "settings": settings,
        "window_s": round(window, 3),
        "first_frame_s": round(first_frame_s, 3),
        "input_fps": (sent1 - sent0) / window,
        "delivered_fps": (n1 - n0) / window,
        "sent": sent1 - sent0,
        "received": n1 - n0,
        "dropped": {
            "sent_minus_received": (sent1 - sent0) - (n1 - n0),
            **_dropped(before, after),
        },
        "server_latency_p50_s": out.get("latency_p50"),
        "server_latency_p90_s": latency_p90,
        "engine_latency_p50_s": stats.get("engine_latency_p50"),
        "engine_latency_p90_s": stats.get("engine_latency_p90"),
        "chunk_s_p50": chunk_p50,
        "chunk_s_p90": stats.get("chunk_latency_p90"),
        "prepare_s_p50": stats.get("prepare_p50"),  # the worker's host time per chunk besides the engine call
        "emit_s_p50": stats.get("emit_p50"),
        # Two readings of "chunk time": the engine's compute per chunk, and a chunk's worth of input at the
        # input rate (what the stream waits for before a chunk can start).
        "latency_p90_in_chunk_compute": latency_p90 / chunk_p50 if latency_p90 and chunk_p50 else None,
        "chunk_period_s": FRAMES_PER_CHUNK * window / max(1, sent1 - sent0),
        "latency_p90_in_chunk_periods": latency_p90 * (sent1 - sent0) / (FRAMES_PER_CHUNK * window)
        if latency_p90
        else None,
        "server_output_fps": out.get("fps"),
    }


def _dropped(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """The server's drop counters, their change over the window, by reason."""
    pairs = {
        "sampled": ("stats", "dropped_sampled"),
        "input_overflow": ("stats", "dropped_input_overflow"),
        "output_overflow": ("output", "dropped_overflow"),
        "stale": ("output", "dropped_stale"),
    }
    out = {}
    for name, (part, key) in pairs.items():
        a, b = before.get(part, {}).get(key), after.get(part, {}).get(key)
        if a is not None and b is not None:
            out[name] = int(b - a)
    return out


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------------
# bench for the same settings
# ------------------------------------------------------------------------------------------------
def bench_fps(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`wanstream bench` for the same size, steps, codecs and batching as the server ran."""
    mode = "batch" if opts.batching == "stream" else "nobatch"
    names = {s: f"{mode},{opts.height}x{opts.width},{s},{opts.codecs}" for s in opts.steps}
    path = work / "bench.json"
    cmd = [sys.executable, "-m", "wanstream.cli.main", "bench", "--configs", ";".join(names.values()),
           "--json", str(path), *opts.bench_arg]  # fmt: skip
    if opts.device:
        cmd += ["--device", opts.device]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.bench_timeout_s)
    if done.returncode != 0 or not path.is_file():
        return {
            "error": f"bench exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}",
            "command": cmd,
        }
    data = json.loads(path.read_text())
    by_name = {r["config"]: r for r in data["results"]}
    return {
        "command": cmd,
        "device": data.get("device"),
        "weights": data.get("weights"),
        "fps": {s: by_name[n]["fps"] for s, n in names.items() if n in by_name},
        "chunk_ms_p50": {s: by_name[n]["chunk_ms_p50"] for s, n in names.items() if n in by_name},
    }


def gpu_name() -> str | None:
    """The GPU's name without touching CUDA in this process (the server owns the GPU)."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


# ------------------------------------------------------------------------------------------------
def run(opts: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="wanstream-live-"))
    serve_args = ["--demo"] if opts.demo else ["--random-weights"]
    if opts.device:
        serve_args += ["--device", opts.device]
    serve_args += opts.serve_arg
    result: dict[str, Any] = {
        "gpu": gpu_name(),
        "serve_args": serve_args,
        "height": opts.height,
        "width": opts.width,
        "codecs": opts.codecs,
        "camera_fps": opts.fps,
        "batching": opts.batching,
        "latency_is": "the server's: input frame arrival -> generated frame handed to the WebRTC encoder",
    }
    server = Server(serve_args, work / "serve.log")
    try:
        status = server.wait_loaded(opts.load_timeout_s)
        result.update(label=status.get("label"), device=status.get("device"))
        result["phases"] = [asyncio.run(measure(server.url, s, opts)) for s in opts.steps]
    finally:
        result["serve_exit"] = server.stop()
        result["serve_log_tail"] = server.log_tail()[-1500:]
    if opts.bench:
        bench = bench_fps(opts, work)
        result["bench"] = bench
        for phase in result["phases"]:
            fps = bench.get("fps", {}).get(phase["steps"])
            if fps and "delivered_fps" in phase:
                phase["bench_fps"] = fps
                phase["delivered_over_bench"] = phase["delivered_fps"] / fps
    shutil.rmtree(work, ignore_errors=True)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="write the JSON here")
    p.add_argument("--demo", action="store_true", help="the tiny demo model instead of --random-weights")
    p.add_argument("--device", help="the server's and bench's device (default: theirs)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", default="1,2,3,4", help="step counts to measure, comma-separated (1-4)")
    p.add_argument("--codecs", choices=sorted(CODECS), default="wan")
    p.add_argument("--fps", type=float, default=30.0, help="camera frames per second")
    p.add_argument(
        "--batching",
        choices=["stream", "none"],
        default="stream",
        help="the stream's batching: 'stream' (the default: throughput) or 'none' (no lanes' lag)",
    )
    p.add_argument("--warm-s", type=float, default=40.0, help="per step count, before measuring (compile)")
    p.add_argument("--warm-first-s", type=float, help="warm-up of the first step count (default: --warm-s)")
    p.add_argument("--measure-s", type=float, default=20.0, help="measurement window per step count")
    p.add_argument("--first-frame-s", type=float, default=300.0, help="wait this long for the first frame")
    p.add_argument("--load-timeout-s", type=float, default=900.0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    p.add_argument("--bench-arg", action="append", default=[], help="extra `bench` argument (repeatable)")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the bench comparison")
    p.add_argument("--bench-timeout-s", type=float, default=1200.0)
    opts = p.parse_args(argv)
    opts.steps = [int(s) for s in opts.steps.split(",") if s.strip()]
    if opts.warm_first_s is None:
        opts.warm_first_s = opts.warm_s
    if not opts.steps or any(s not in STEP_LISTS for s in opts.steps):
        p.error("--steps: comma-separated step counts among 1, 2, 3, 4")
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse(argv)
    result = run(opts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1))
    for phase in result.get("phases", []):
        if "error" in phase:
            print(f"steps {phase['steps']}: {phase['error']}")
            continue
        bench = phase.get("bench_fps")
        print(
            f"steps {phase['steps']}: delivered {phase['delivered_fps']:.1f} FPS of {phase['input_fps']:.1f} in"
            + (f" (bench {bench:.1f}, {100 * phase['delivered_over_bench']:.0f}%)" if bench else "")
            + f", server latency p50/p90 {_ms(phase['server_latency_p50_s'])}/{_ms(phase['server_latency_p90_s'])} ms"
            + f", chunk p50 {_ms(phase['chunk_s_p50'])} ms (+ prepare {_ms(phase['prepare_s_p50'])}, emit"
            + f" {_ms(phase['emit_s_p50'])}), dropped {phase['dropped']}"
        )
    return result


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.0f}"


if __name__ == "__main__":
    main()
