"""What a chunk costs on this device, so a stream the device cannot serve in real time is refused up front.

A chunk's time grows with its pixels and its denoising steps. Every chunk the engine runs is measured
(`observe`), as seconds per pixel and step, per autoencoder pair (the Wan VAE costs far more than TAEHV).
A new stream, or a live resolution change, is estimated from that before any of its work starts
(`check`): over `max_chunk_s` it is refused with the estimate and the limit. Growing the size is
extrapolated super-linearly (attention grows with the square of the tokens), so the estimate errs long.
Before anything has been measured, only sizes up to the model's native one are let through, so the first
measurement is never an hour-long chunk.

A bounded chunk time is what makes stopping a stream prompt: its engine thread ends at the next chunk
boundary, at most one chunk time after it is told to.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from wanstream.engine.settings import StreamSettings

NATIVE_PIXELS = 480 * 832  # Wan2.1's own size: allowed before anything is measured
WARMUP_CHUNKS = 2  # a stream's first chunks include compilation and allocation: not measured
_SMOOTHING = 0.2  # weight of a new measurement (exponential moving average)


class TooSlow(ValueError):
    """The device cannot make chunks of this size in real time (HTTP 422); the message has the figures."""


@dataclass
class _Rate:
    seconds_per_pixel_step: float
    pixels: int  # the size it was measured at (extrapolation beyond it grows faster than linear)


class ChunkCost:
    def __init__(self, max_chunk_s: float, unmeasured_pixels: int = NATIVE_PIXELS) -> None:
        self.max_chunk_s = max_chunk_s
        self.unmeasured_pixels = unmeasured_pixels
        self._rates: dict[tuple[str, str], _Rate] = {}
        self._lock = threading.Lock()  # a few float updates; never held across engine work

    def observe(self, settings: StreamSettings, seconds: float) -> None:
        """A chunk of `settings` took `seconds` (called by engine threads after each measured chunk)."""
        pixels, steps = settings.height * settings.width, len(settings.denoising_steps)
        rate = seconds / (pixels * steps)
        key = _key(settings)
        with self._lock:
            old = self._rates.get(key)
            if old is None:
                self._rates[key] = _Rate(rate, pixels)
            else:
                blended = (1 - _SMOOTHING) * old.seconds_per_pixel_step + _SMOOTHING * rate
                self._rates[key] = _Rate(blended, max(old.pixels, pixels))

    def estimate(self, settings: StreamSettings) -> float | None:
        """Seconds per chunk for `settings`, or None before anything like it has been measured."""
        key = _key(settings)
        with self._lock:
            rate = self._rates.get(key)
            if rate is None and key[0] == "-":  # text mode: a video stream's cost (it also encodes) bounds it
                rate = max(
                    (r for k, r in self._rates.items() if k[1] == key[1]),
                    key=lambda r: r.seconds_per_pixel_step,
                    default=None,
                )
        if rate is None:
            return None
        pixels = settings.height * settings.width
        growth = max(1.0, pixels / rate.pixels) ** 0.5  # attention: more than linear beyond what was seen
        return rate.seconds_per_pixel_step * pixels * len(settings.denoising_steps) * growth

    def check(self, settings: StreamSettings) -> None:
        """Raise TooSlow when chunks of `settings` would take longer than `max_chunk_s` here."""
        size = f"{settings.width}×{settings.height}"
        estimate = self.estimate(settings)
        if estimate is None:
            pixels = settings.height * settings.width
            if pixels > self.unmeasured_pixels:
                raise TooSlow(
                    f"{size} is larger than this device has been measured at ({self.unmeasured_pixels} pixels "
                    "before the first stream); start at a smaller size first, so the cost can be measured"
                )
            return
        if estimate > self.max_chunk_s:
            raise TooSlow(
                f"{size} with {len(settings.denoising_steps)} step(s) would take about {estimate:.1f} s per chunk on "
                f"this device; the limit is {self.max_chunk_s:g} s per chunk (real time): use a smaller "
                "size or fewer steps"
            )


def _key(settings: StreamSettings) -> tuple[str, str]:
    encoder = settings.encoder if settings.mode == "video" else "-"
    return (encoder, settings.decoder)
