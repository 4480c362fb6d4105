"""Device memory: what to tell the user when a stream runs out of it, and giving it back afterwards.

An out-of-memory error ends only the stream that hit it: its caches and captured graphs are dropped and the
allocator's cache is emptied, so the next stream on the same process starts without a restart.
"""

from __future__ import annotations

import gc
import re

import torch

from wanstream.engine.settings import StreamSettings


def release_device_memory(device: torch.device) -> None:
    """Return cached blocks to the driver once the stream's tensors are unreferenced."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def out_of_memory_message(error_text: str, device: torch.device, settings: StreamSettings) -> str:
    """One paragraph: what ran out, how much was asked for, what is free now, and what to lower."""
    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]i?B)", error_text)
    need = f" (it asked for {asked.group(1)} more)" if asked else ""
    have = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device)
        have = f"; now {_gib(free)} of {_gib(total)} free, {_gib(held)} held by this process"
    steps = len(settings.denoising_steps)
    return (
        f"out of GPU memory at {settings.width}x{settings.height}, {steps} step(s), batching "
        f"'{settings.batching}'{need}{have}. This stream was stopped and its memory released; try "
        + what_to_lower(settings)
        + "."
    )


def what_to_lower(settings: StreamSettings) -> str:
    """The settings that cost device memory, in the order worth trying, as one phrase."""
    lower = [
        "a smaller size"
        + (" (e.g. 480x832 or 512x512)" if settings.height * settings.width > 480 * 832 else ""),
        "fewer denoising steps" if len(settings.denoising_steps) > 1 else None,
        "batching 'none' (one cache lane instead of one per step)" if settings.batching == "stream" else None,
        f"a shorter KV cache (kv_cache_frames {settings.kv_cache_frames})"
        if settings.kv_cache_frames > 3
        else None,
        "the low-memory profile (--low-vram: fp8 DiT weights, TAEHV, text encoder off the GPU)",
        "fewer streams at once, or another program's use of the GPU",
    ]
    return ", ".join(x for x in lower if x)


def free_device_bytes(device: torch.device) -> int:
    """What a new stream can still get: the driver's free memory plus what this process's allocator holds
    unused (cached blocks are reused before asking the driver)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
