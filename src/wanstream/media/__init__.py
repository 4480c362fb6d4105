"""Media I/O: video files in and out, resizing, and the built-in sample clip."""

from wanstream.media.sample import (
    SAMPLE_FPS,
    SAMPLE_FRAMES,
    SAMPLE_HEIGHT,
    SAMPLE_WIDTH,
    iter_sample_clip,
    sample_clip,
    scene_cuts,
    write_sample_clip,
)
from wanstream.media.video import (
    Frame,
    RoundedSize,
    VideoError,
    VideoInfo,
    VideoReader,
    VideoWriter,
    probe_video,
    read_video,
    resize_frames,
    round_size,
)

__all__ = [
    "SAMPLE_FPS",
    "SAMPLE_FRAMES",
    "SAMPLE_HEIGHT",
    "SAMPLE_WIDTH",
    "Frame",
    "RoundedSize",
    "VideoError",
    "VideoInfo",
    "VideoReader",
    "VideoWriter",
    "iter_sample_clip",
    "probe_video",
    "read_video",
    "resize_frames",
    "round_size",
    "sample_clip",
    "scene_cuts",
    "write_sample_clip",
]
