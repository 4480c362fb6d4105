"""GPU texture sharing with other applications on the same machine: Spout (Windows) and Syphon (macOS).

Both are optional extras (`pip install 'wanstream[spout]'` on Windows, `'wanstream[syphon]'` on macOS)
behind the same sink interface as NDI; on other systems they report why they are unavailable. Frames are
uploaded from the CPU (the engine hands sinks RGB arrays), which at stream resolutions costs well under
a millisecond.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from wanstream.server.io.sinks import QueuedSink, SinkUnavailable, fit_frame, rgbx

if TYPE_CHECKING:
    from wanstream.server.frames import OutputFrame

GL_RGBA = 0x1908  # OpenGL's constant (SpoutGL takes the pixel format as a GL enum)


def spout_availability() -> tuple[bool, str]:
    if sys.platform != "win32":
        return False, f"Spout is Windows-only (this is {sys.platform}); use NDI to reach other machines"
    try:
        import SpoutGL  # noqa: F401
    except ImportError as exc:
        return False, f"SpoutGL is not installed ({exc}); pip install 'wanstream[spout]'"
    return True, "SpoutGL is installed"


def syphon_availability() -> tuple[bool, str]:
    if sys.platform != "darwin":
        return False, f"Syphon is macOS-only (this is {sys.platform}); use NDI to reach other machines"
    try:
        import syphon  # noqa: F401
    except ImportError as exc:
        return False, f"syphon-python is not installed ({exc}); pip install 'wanstream[syphon]'"
    return True, "syphon-python is installed"


class SpoutSink(QueuedSink):
    """Frames as a Spout sender called `name` (Resolume, TouchDesigner, OBS with the Spout plugin)."""

    kind = "spout"

    def __init__(self, name: str | None = None, *, capacity: int = 8) -> None:
        super().__init__(name or "wanstream", capacity=capacity)
        self._sender: Any = None
        self._size = (0, 0)

    def open(self, height: int, width: int, fps: float) -> None:
        ok, reason = spout_availability()
        if not ok:
            raise SinkUnavailable(reason)
        import SpoutGL

        sender = SpoutGL.SpoutSender()
        sender.setSenderName(self.name)
        self._sender, self._size = sender, (height, width)

    def write(self, frame: OutputFrame) -> None:
        height, width = self._size
        data = rgbx(fit_frame(frame.image, height, width))
        if not self._sender.sendImage(data.tobytes(), width, height, GL_RGBA, False, 0):
            raise SinkUnavailable("Spout refused the frame (no OpenGL context could be created)")
        self._sender.setFrameSync(self.name)

    def release(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.releaseSender()


class SyphonSink(QueuedSink):
    """Frames as a Syphon (Metal) server called `name` (Resolume, TouchDesigner, VDMX, OBS)."""

    kind = "syphon"

    def __init__(self, name: str | None = None, *, capacity: int = 8) -> None:
        super().__init__(name or "wanstream", capacity=capacity)
        self._server: Any = None
        self._texture: Any = None
        self._size = (0, 0)

    def open(self, height: int, width: int, fps: float) -> None:
        ok, reason = syphon_availability()
        if not ok:
            raise SinkUnavailable(reason)
        import syphon
        from syphon.utils.raw import create_mtl_texture

        self._server = syphon.SyphonMetalServer(self.name)
        self._texture = create_mtl_texture(self._server.device, width, height)
        self._size = (height, width)

    def write(self, frame: OutputFrame) -> None:
        from syphon.utils.numpy import copy_image_to_mtl_texture

        height, width = self._size
        copy_image_to_mtl_texture(rgbx(fit_frame(frame.image, height, width)), self._texture)
        self._server.publish_frame_texture(self._texture)

    def release(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
