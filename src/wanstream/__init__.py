"""wanstream: real-time video diffusion (StreamDiffusionV2 on a causal Wan2.1 DiT)."""

__version__ = "0.1.0"
