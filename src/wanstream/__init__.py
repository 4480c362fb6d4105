"""wanstream: real-time video diffusion (StreamDiffusionV2 on a causal Wan2.1 DiT)."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from wanstream.engine.session import StreamSession
    from wanstream.engine.settings import StreamSettings
    from wanstream.pipeline import Pipeline

__all__ = ["Pipeline", "StreamSession", "StreamSettings", "__version__"]


def __getattr__(name: str):  # lazy: `import wanstream` stays light (no torch until needed)
    if name == "Pipeline":
        from wanstream.pipeline import Pipeline

        return Pipeline
    if name == "StreamSession":
        from wanstream.engine.session import StreamSession

        return StreamSession
    if name == "StreamSettings":
        from wanstream.engine.settings import StreamSettings

        return StreamSettings
    raise AttributeError(f"module 'wanstream' has no attribute {name!r}")
