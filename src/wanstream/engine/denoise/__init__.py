"""Denoiser backends of a `StreamSession`: the protocol (`base`) and the single-process one (`local`)."""
