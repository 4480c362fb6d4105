"""What this machine offers a live rig: the GPU and each input / output, with the reason when one is missing.

The I/O checks import optional packages and read sysfs (never open a device or start the NDI runtime,
so asking sends nothing on the network); they run once, off the event loop (the server starts them at
start-up), and are cached. GPU memory is read fresh for /api/v1/hardware.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from wanstream.server.io import ndi, texshare, virtualcam
from wanstream.server.io.mpegts import h264_encoder

_lock = threading.Lock()
_io: dict[str, dict[str, Any]] | None = None


def io_availability() -> dict[str, dict[str, Any]]:
    """{kind: {"available": bool, "reason": str, "direction": ...}} (blocking the first time: call it off the loop)."""
    global _io
    with _lock:
        if _io is None:
            encoder = h264_encoder()
            checks: dict[str, tuple[str, tuple[bool, str]]] = {
                "webrtc": ("in/out", (True, "the studio or any WebRTC client")),
                "screen_capture": (
                    "in",
                    (True, "in the studio: the browser's display capture (Share screen)"),
                ),
                "file": ("in", (True, "a video from the media folder (--media-dir), headless")),
                "ts": (
                    "out",
                    (True, f"H.264 ({encoder}) in MPEG-TS at /api/v1/sessions/{{id}}/output.ts")
                    if encoder
                    else (False, "this PyAV build has no H.264 encoder (libx264 or libopenh264)"),
                ),
                "ndi": ("in/out", ndi.availability()),
                "virtualcam": ("out", virtualcam.availability()),
                "spout": ("out", texshare.spout_availability()),
                "syphon": ("out", texshare.syphon_availability()),
            }
            _io = {
                kind: {"available": ok, "direction": direction, "reason": reason}
                for kind, (direction, (ok, reason)) in checks.items()
            }
        return {k: dict(v) for k, v in _io.items()}


def forget() -> None:
    """Check again next time (a device was plugged in, a package installed)."""
    global _io
    with _lock:
        _io = None


def gpus() -> list[dict[str, Any]]:
    """Each CUDA GPU: name, total and free memory in bytes ([] without one)."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        found.append({"index": index, "name": props.name, "vram_bytes": total, "vram_free_bytes": free})
    return found


def hardware() -> dict[str, Any]:
    """The full report (GET /api/v1/hardware)."""
    found = gpus()
    io = io_availability()
    # Not cached: the server's setting (--no-ndi-discovery), not the machine's.
    io["ndi"]["discovery"] = "mdns" if ndi.discovery_enabled() else "off: direct addresses (HOST:PORT) only"
    return {"gpu": found[0]["name"] if found else "no GPU", "gpus": found, "io": io}


def summary() -> dict[str, Any]:
    """The short form for /health, cheap enough for the event loop: the GPU's name and memory (from the
    device properties) and the available I/O kinds once checked (None until the first check has run;
    the server runs it at start-up)."""
    gpu, vram = "no GPU", None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, vram = props.name, props.total_memory
    io = _io
    return {
        "gpu": gpu,
        "vram_bytes": vram,
        "io": sorted(kind for kind, v in io.items() if v["available"]) if io is not None else None,
    }
