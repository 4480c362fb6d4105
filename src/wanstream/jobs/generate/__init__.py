"""The offline job: an input video (or the built-in clip, or nothing in text mode) and prompts in, an MP4 out."""
