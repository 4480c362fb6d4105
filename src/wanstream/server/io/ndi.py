"""NDI in and out (the `ndi-python` binding of the NDI SDK; `pip install 'wanstream[live]'`).

* `NdiSink` sends a session's frames as an NDI source named after the sink (`--sink ndi:NAME`).
* `NdiSource` receives an NDI source into a session, found by name (discovery) or at a direct
  address (`HOST:PORT`, which needs no discovery at all).

Discovery is NDI's mDNS (multicast) by default. `configure(discovery=False)` (`serve --no-ndi-discovery`)
points the runtime at a discovery server on 127.0.0.1 instead, which turns mDNS off: nothing is
announced or browsed, and only direct addresses work. The NDI runtime is process-wide: it reads its
configuration once, when the first sender or receiver starts.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from wanstream.server.io.sinks import QueuedSink, SinkUnavailable, fit_frame, rgbx

if TYPE_CHECKING:
    from wanstream.server.frames import OutputFrame

log = logging.getLogger("wanstream.server")

INSTALL_HINT = (
    "install the NDI extra: pip install 'wanstream[live]' (the ndi-python wheel bundles the runtime)"
)
MAX_SOURCE_PIXELS = 4096 * 4096  # larger NDI frames are refused (the stream is resized far below anyway)
RECEIVE_POLL_MS = 200

_lock = threading.Lock()
_senders_lock = threading.Lock()
# discovery: the setting; started_with: the setting the runtime started with (None: not started yet).
_state: dict[str, Any] = {"discovery": True, "started_with": None, "config_dir": None}


def configure(*, discovery: bool) -> None:
    """Choose discovery (mDNS) or direct addresses only. The runtime reads it when it starts; a process whose
    runtime already started the other way refuses NDI (`runtime`) rather than break the setting."""
    with _lock:
        _state["discovery"] = discovery


def discovery_enabled() -> bool:
    return bool(_state["discovery"])


def module() -> ModuleType:
    """The NDI binding, or `SinkUnavailable` saying how to get it."""
    try:
        import NDIlib
    except ImportError as exc:
        raise SinkUnavailable(f"NDI is not installed ({exc}); {INSTALL_HINT}") from None
    return NDIlib


def availability() -> tuple[bool, str]:
    """Whether NDI can run here, without starting the runtime (so it is cheap and sends nothing)."""
    try:
        ndi = module()
    except SinkUnavailable as exc:
        return False, str(exc)
    if not ndi.is_supported_CPU():
        return False, "the NDI runtime does not support this CPU (it needs SSE4.2 on x86)"
    return True, f"NDI runtime {_version(ndi)}"


def runtime() -> ModuleType:
    """The binding with its runtime started (once per process, with the chosen discovery setting)."""
    ndi = module()
    with _lock:
        started = _state["started_with"]
        if started is not None and started != _state["discovery"]:
            raise SinkUnavailable(
                "the NDI runtime of this process started with discovery "
                f"{'on' if started else 'off'}; restart the server to change --no-ndi-discovery"
            )
        if started is None:
            if not _state["discovery"] and "NDI_CONFIG_DIR" not in os.environ:
                os.environ["NDI_CONFIG_DIR"] = str(_write_direct_only_config())
            if not ndi.initialize():
                raise SinkUnavailable(
                    "the NDI runtime could not start on this machine (NDIlib_initialize failed: an "
                    "unsupported CPU or a missing runtime library)"
                )
            _state["started_with"] = _state["discovery"]
    return ndi


def _write_direct_only_config() -> Path:
    """An NDI configuration that turns mDNS off: discovery goes to a (non-existent) server on loopback."""
    folder = Path(tempfile.mkdtemp(prefix="wanstream-ndi-"))
    config = {
        "ndi": {
            "networks": {"ips": "", "discovery": "127.0.0.1"},
            "multicast": {"send": {"enable": False}, "recv": {"enable": False}},
        }
    }
    (folder / "ndi-config.v1.json").write_text(json.dumps(config))
    _state["config_dir"] = folder
    return folder


def _version(ndi: ModuleType) -> str:
    try:
        return str(ndi.version()).rsplit(" ", 1)[-1]
    except Exception:
        return "(unknown version)"


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') → (host, port); ValueError with the expected form."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"an NDI address is HOST:PORT (e.g. 127.0.0.1:5961), got {address!r}")
    return host, int(port)


def discover(timeout: float) -> list[str]:
    """NDI source names seen on the network within `timeout` seconds (blocking; mDNS)."""
    if not discovery_enabled():
        raise SinkUnavailable(
            "NDI discovery is off on this server (--no-ndi-discovery): use a direct address"
        )
    ndi = runtime()
    finder = ndi.find_create_v2()
    if finder is None:
        raise SinkUnavailable("the NDI finder could not start")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ndi.find_wait_for_sources(finder, max(1, round((deadline - time.monotonic()) * 1000)))
        return sorted(s.ndi_name for s in ndi.find_get_current_sources(finder))
    finally:
        ndi.find_destroy(finder)


def own_listening_ports() -> set[int]:
    """TCP ports this process listens on (Linux: /proc), to tell which port a new NDI sender took."""
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        ports = set()
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            with open(table) as f:
                for line in list(f)[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports
    except OSError:
        return set()


class NdiSink(QueuedSink):
    """The session's frames as an NDI source called `name` (receivers find it as 'HOST (name)')."""

    kind = "ndi"

    def __init__(self, name: str | None = None, *, capacity: int = 8) -> None:
        super().__init__(name or "wanstream", capacity=capacity)
        self._sender: Any = None
        self._ndi: ModuleType | None = None
        self._size = (0, 0)
        self._fps = 30.0
        self.port: int | None = None
        self.source_name: str | None = None
        self.connections = 0  # receivers connected (counted on the sink thread, which alone uses the sender)

    def open(self, height: int, width: int, fps: float) -> None:
        ndi = runtime()
        create = ndi.SendCreate()
        create.ndi_name = self.name
        create.clock_video = False  # the sink paces frames itself
        with _senders_lock:  # one sender at a time, so the new port is this sender's
            before = own_listening_ports()
            sender = ndi.send_create(create)
            new = sorted(own_listening_ports() - before)
        if sender is None:
            raise SinkUnavailable(f"the NDI sender {self.name!r} could not be created")
        self._ndi, self._sender = ndi, sender
        self._size, self._fps = (height, width), fps
        # The port receivers connect to by direct address (NDI listens on a new one per sender; the
        # other new port, if any, is the runtime's own messaging server, on a lower port).
        self.port = new[-1] if new else None
        self.source_name = ndi.send_get_source_name(sender).ndi_name or None

    def write(self, frame: OutputFrame) -> None:
        ndi = self._ndi
        assert ndi is not None
        height, width = self._size
        data = rgbx(fit_frame(frame.image, height, width))
        video = ndi.VideoFrameV2(width, height, ndi.FOURCC_VIDEO_TYPE_RGBX)
        video.frame_rate_N, video.frame_rate_D = max(1, round(self._fps * 1000)), 1000
        video.data = data
        ndi.send_send_video_v2(self._sender, video)  # copies (the async variant would need the buffer kept)
        self.connections = ndi.send_get_no_connections(self._sender, 0)

    def release(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None and self._ndi is not None:
            self._ndi.send_destroy(sender)

    def describe(self) -> dict[str, Any]:
        return {"source_name": self.source_name, "port": self.port, "connections": self.connections}


class NdiSource:
    """Receives an NDI source on a thread and feeds its frames (RGB uint8) into a session, as a camera would.

    Give `name` (as discovery lists it: 'HOST (STREAM)') or `address` ('HOST:PORT', no discovery)."""

    def __init__(
        self,
        feed: Callable[[np.ndarray, float], None],
        *,
        name: str | None = None,
        address: str | None = None,
        label: str = "ndi",
    ) -> None:
        if not (name or address):
            raise ValueError("an NDI source needs a name (discovery) or an address (HOST:PORT)")
        if address is not None:
            parse_address(address)
        if name and not address and not discovery_enabled():
            raise ValueError(
                "NDI discovery is off on this server (--no-ndi-discovery): give the source's address"
            )
        self._ndi = runtime()
        self._feed = feed
        self.name = name
        self.address = address
        create = self._ndi.RecvCreateV3()
        create.color_format = self._ndi.RECV_COLOR_FORMAT_RGBX_RGBA
        create.bandwidth = self._ndi.RECV_BANDWIDTH_HIGHEST
        create.ndi_recv_name = f"wanstream {label}"
        self._receiver = self._ndi.recv_create_v3(create)
        if self._receiver is None:
            raise SinkUnavailable("the NDI receiver could not be created")
        self._ndi.recv_connect(self._receiver, self._ndi.Source(p_ndi_name=name or "", p_url_address=address))
        self._stop = threading.Event()
        self.frames = 0
        self.finished = False  # a live source never ends by itself
        self.error: str | None = None  # the source stopped (the session ends)
        self.problem: str | None = None  # the last frame that was skipped, and why (the stream goes on)
        self.connected = False
        self._thread = threading.Thread(target=self._run, name=f"wanstream-source-ndi-{label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is not None:
            self._thread.join(timeout)
        alive = self._thread.is_alive()
        if not alive and self._receiver is not None:
            self._ndi.recv_destroy(self._receiver)
            self._receiver = None
        return not alive

    def status(self) -> dict[str, Any]:
        return {
            "kind": "ndi",
            "name": self.name,
            "address": self.address,
            "connected": self.connected,
            "frames": self.frames,
            "error": self.error,
            "problem": self.problem,
        }

    def _run(self) -> None:
        ndi = self._ndi
        try:
            while not self._stop.is_set():
                kind, video, _, _ = ndi.recv_capture_v2(self._receiver, RECEIVE_POLL_MS)
                if kind != ndi.FRAME_TYPE_VIDEO:
                    if kind == ndi.FRAME_TYPE_ERROR:
                        self.connected = False
                    continue
                try:
                    image = self._rgb(video)
                finally:
                    ndi.recv_free_video_v2(self._receiver, video)
                self.connected = True
                if image is not None:
                    self._feed(image, time.monotonic())
                    self.frames += 1
        except Exception as exc:
            self.error = f"NDI receive failed: {exc}"
            log.warning("%s", self.error)

    def _rgb(self, video: Any) -> np.ndarray | None:
        ndi = self._ndi
        if video.xres * video.yres > MAX_SOURCE_PIXELS:
            self.problem = (
                f"NDI frames of {video.xres}×{video.yres} are larger than {MAX_SOURCE_PIXELS} pixels"
            )
            return None
        data = np.asarray(video.data)
        if video.FourCC in (ndi.FOURCC_VIDEO_TYPE_RGBX, ndi.FOURCC_VIDEO_TYPE_RGBA):
            return np.ascontiguousarray(data[..., :3])
        if video.FourCC in (ndi.FOURCC_VIDEO_TYPE_BGRX, ndi.FOURCC_VIDEO_TYPE_BGRA):
            return np.ascontiguousarray(data[..., 2::-1])
        self.problem = f"NDI frames in {video.FourCC} are not handled (asked for RGBX)"
        return None
