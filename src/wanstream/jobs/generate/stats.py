"""What a `generate` run measured (`GenerateStats`: its p50 / p90 are `engine.measure.percentile`, as every
p50 / p90 of the product) and the small formatters its messages and summary share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerateStats:
    """What the run measured. Definitions (docs/generate.md):

    * wall_s: from the start of the job (model already loaded: session set-up, prompt encoding, input
      decoding, every chunk, output encoding) to the output file closed. `load_s`: loading the model.
    * time_to_first_frame_s: from the start of the job to the first output frame in host memory.
    * chunk latency: one chunk's processing — input to the engine, every denoising step, decode, and the
      frames that came out copied to host memory (the timer stops after the copy).
    * steady state: the chunks after warm-up — the first chunk of a stream (5 frames, 2 latents) and, in
      stream batch, the N−1 chunks that fill the N step lanes — excluding the end-of-input flush and the
      drain of a cut. steady_fps = frames out of those chunks / their total latency.
    """

    frames: int
    input_frames: int
    chunks: int
    wall_s: float
    load_s: float | None
    time_to_first_frame_s: float | None
    first_chunk_ms: float | None
    steady_chunks: int
    steady_fps: float | None
    chunk_latency_p50_ms: float | None
    chunk_latency_p90_ms: float | None

    @property
    def overall_fps(self) -> float | None:
        return self.frames / self.wall_s if self.wall_s > 0 else None

    def summary_lines(self) -> list[str]:
        lines = [
            f"{frames_text(self.frames)} in {self.wall_s:.2f} s ({_fmt(self.overall_fps, '.1f')} fps overall)"
        ]
        if self.steady_fps is not None:
            lines.append(
                f"steady state: {self.steady_fps:.2f} fps over {self.steady_chunks} chunks; "
                f"chunk latency p50 {self.chunk_latency_p50_ms:.0f} ms, p90 {self.chunk_latency_p90_ms:.0f} ms"
            )
        else:
            lines.append("steady state: not reached (too few chunks after warm-up)")
        first = f"time to first frame {_fmt(self.time_to_first_frame_s, '.2f')} s"
        if self.first_chunk_ms is not None:
            first += f" (first chunk {self.first_chunk_ms:.0f} ms)"
        if self.load_s is not None:
            first += f"; model load {self.load_s:.1f} s"
        lines.append(first)
        return lines


def frames_text(n: int) -> str:
    """'1 frame', '49 frames'."""
    return f"{n} frame" if n == 1 else f"{n} frames"


def number_text(x: float) -> str:
    """16.0 → '16', 29.97 → '29.97' (frame rates in messages)."""
    return f"{x:g}" if abs(x - round(x)) > 1e-9 else str(round(x))


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def rounded(x: float | None, digits: int = 4) -> float | None:
    """For the stats JSON: 4 decimals, None kept."""
    return None if x is None else round(x, digits)
