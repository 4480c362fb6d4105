"""The StreamDiffusionV2 algorithm: per-stream state, batching, noise control, prompts, sessions."""
