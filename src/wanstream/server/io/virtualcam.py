"""A virtual camera sink (`pyvirtualcam`): the generated stream as a webcam for Zoom, OBS, browsers.

On Linux it writes to a v4l2loopback device (`sudo modprobe v4l2loopback`), elsewhere to the OBS
virtual camera (or Unity Capture on Windows). The camera is opened at the stream's size when the sink
is added, so a missing device is a clear error at once rather than a silent sink.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from wanstream.server.io.sinks import QueuedSink, SinkUnavailable, fit_frame

if TYPE_CHECKING:
    from wanstream.server.frames import OutputFrame

INSTALL_HINT = "install the virtual-camera extra: pip install 'wanstream[live]'"
DEVICE_HINT = {
    "linux": "load the v4l2loopback kernel module: sudo modprobe v4l2loopback devices=1 exclusive_caps=1",
    "darwin": "install OBS and start its virtual camera once (Start Virtual Camera)",
    "win32": "install OBS (its virtual camera) or Unity Capture",
}


def _pyvirtualcam() -> Any:
    try:
        import pyvirtualcam
    except ImportError as exc:
        raise SinkUnavailable(f"pyvirtualcam is not installed ({exc}); {INSTALL_HINT}") from None
    return pyvirtualcam


def device_hint() -> str:
    return DEVICE_HINT.get(sys.platform, "install a virtual camera driver pyvirtualcam supports")


def availability() -> tuple[bool, str]:
    """Whether a virtual camera can open here (checked without opening one where the OS allows)."""
    try:
        _pyvirtualcam()
    except SinkUnavailable as exc:
        return False, str(exc)
    if sys.platform == "linux":
        devices = _loopback_devices()
        if not devices:
            return False, f"no v4l2loopback device (/dev/video*): {device_hint()}"
        return True, f"v4l2loopback: {', '.join(devices)}"
    return True, "pyvirtualcam is installed (the camera is checked when the sink opens)"


def _loopback_devices() -> list[str]:
    """/dev/videoN devices whose driver is v4l2loopback (from sysfs: nothing is opened)."""
    from pathlib import Path

    found = []
    for node in sorted(Path("/sys/class/video4linux").glob("video*")):
        try:
            name = (node / "name").read_text().strip()
            driver = (node / "device" / "driver").resolve().name if (node / "device").exists() else ""
        except OSError:
            continue
        if "loopback" in (driver + " " + name).lower():
            found.append(f"/dev/{node.name}")
    return found


class VirtualCameraSink(QueuedSink):
    """Frames to a virtual camera; `name` picks the device (e.g. /dev/video4), default: the first free one."""

    kind = "virtualcam"

    def __init__(
        self, name: str | None = None, *, capacity: int = 8, camera: Callable[..., Any] | None = None
    ) -> None:
        super().__init__(name, capacity=capacity)
        self._make_camera = camera
        self._camera: Any = None
        self._size = (0, 0)
        self.device: str | None = None

    def open(self, height: int, width: int, fps: float) -> None:
        make = self._make_camera
        fmt: Any = None
        if make is None:
            pyvirtualcam = _pyvirtualcam()
            make, fmt = pyvirtualcam.Camera, pyvirtualcam.PixelFormat.RGB
        kwargs: dict[str, Any] = {"width": width, "height": height, "fps": max(1.0, fps), "device": self.name}
        if fmt is not None:
            kwargs["fmt"] = fmt
        try:
            self._camera = make(**kwargs)
        except Exception as exc:  # pyvirtualcam raises RuntimeError naming the backend's problem
            raise SinkUnavailable(f"the virtual camera could not open: {exc} ({device_hint()})") from None
        self._size = (height, width)
        self.device = str(getattr(self._camera, "device", self.name or ""))

    def write(self, frame: OutputFrame) -> None:
        height, width = self._size
        self._camera.send(np.ascontiguousarray(fit_frame(frame.image, height, width)))

    def release(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            camera.close()

    def describe(self) -> dict[str, Any]:
        return {"device": self.device}
