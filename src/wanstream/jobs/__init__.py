"""Offline jobs built on the engine: `generate` (an input video or text and prompts in, an MP4 out)."""
