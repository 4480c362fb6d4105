"""Before a stream starts: will it fit this GPU, and how fast will it run? Estimated from measured rows.

`wanstream bench --write-estimates FILE` measures peak memory and FPS per (GPU, size, steps, codecs,
batching, precision, text-encoder placement) and writes them as a versioned JSON table. For a requested
stream, the nearest measured row of the same GPU and the same choices is scaled — an *estimate*, said so
everywhere it is shown:

* memory: the models as measured, plus the row's stream memory (activations, KV cache, graph pools)
  scaled by pixels × cache lanes;
* FPS: the row's FPS scaled by (its pixels × steps) / (the stream's pixels × steps).

The stream's share (estimate minus the models, which are already loaded) is compared with the memory this
GPU still has: clearly over → refused, saying what to lower; near → a warning. Without a row for this GPU
only the KV cache, whose size is exact, is checked (`engine.memory` says what to lower either way).

Tables are read from the package data (`wanstream/data/estimates.json`, when shipped) and the user's file
(`$WANSTREAM_ESTIMATES`, default `~/.cache/wanstream/estimates.json`), the user's rows first.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from wanstream.engine.components import Components
from wanstream.engine.denoise.local import cache_config
from wanstream.engine.memory import free_device_bytes, what_to_lower
from wanstream.engine.settings import StreamSettings

TABLE_VERSION = 1
ENV_ESTIMATES = "WANSTREAM_ESTIMATES"
PACKAGE_TABLE = Path(__file__).resolve().parent.parent / "data" / "estimates.json"
GiB = 2**30
WARN_FRACTION = 0.9  # the stream would take more than this share of what is free: warn
REFUSE_FRACTION = 1.2  # more than this multiple of what is free (the estimate's margin): refuse

Level = Literal["ok", "warn", "refuse"]


class WontFit(ValueError):
    """The stream would not fit the GPU's free memory (the message has the figures and what to lower)."""


@dataclass(frozen=True)
class Row:
    """One measured configuration (what `bench --write-estimates` records)."""

    gpu: str
    height: int
    width: int
    steps: int
    codecs: str  # "wan" | "taehv" | "fast" (Wan encoder + TAEHV decoder)
    batching: str  # "stream" | "none"
    precision: str  # "bf16" | "fp8"
    text_encoder: str  # "gpu" | "fp8" | "host" | "none" (measured without one)
    peak_gib: float  # the process's peak reserved GPU memory during the run
    models_gib: float  # allocated by the networks before the stream
    fps: float
    measured: str = ""  # when and with what (torch version), for the reader

    @property
    def lanes(self) -> int:
        return self.steps if self.batching == "stream" else 1


@dataclass(frozen=True)
class Estimate:
    memory_gib: float  # the whole process at the stream's peak (models included)
    stream_gib: float  # the stream's own share (what must still be free)
    fps: float
    basis: Row  # the measured row it was scaled from

    def describe(self) -> str:
        b = self.basis
        return (
            f"estimated peak {self.memory_gib:.1f} GiB ({self.stream_gib:.1f} GiB for the stream) and "
            f"{self.fps:.1f} FPS, scaled from a measurement on this GPU at {b.width}x{b.height}, {b.steps} "
            f"step(s) ({b.peak_gib:.1f} GiB, {b.fps:.1f} FPS) — an estimate"
        )


@dataclass(frozen=True)
class Fit:
    level: Level
    message: str  # empty when there is nothing to say
    estimate: Estimate | None = None


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
def user_table_path() -> Path:
    env = os.environ.get(ENV_ESTIMATES)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wanstream" / "estimates.json"


def read_rows(path: Path) -> list[Row]:
    """The rows of one table file; a missing file has none. A file of another version or shape is an
    error naming it (rows are never guessed from a format this code does not know)."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, this wanstream reads version {TABLE_VERSION}")
        names = {f.name for f in fields(Row)}
        return [Row(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a wanstream estimates table ({exc}); re-measure with bench") from None


def load_rows(paths: tuple[Path, ...] | None = None) -> list[Row]:
    """Rows of the user's table, then the packaged one (a bad file is reported, not fatal: no rows)."""
    rows: list[Row] = []
    for path in paths or (user_table_path(), PACKAGE_TABLE):
        try:
            rows += read_rows(path)
        except ValueError as exc:
            import warnings

            warnings.warn(str(exc), stacklevel=2)
    return rows


def write_rows(path: Path, new: list[Row]) -> None:
    """Add `new` to the table at `path`, replacing rows of the same configuration; atomic."""
    keep = [r for r in read_rows(path) if _key(r) not in {_key(n) for n in new}]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"version": TABLE_VERSION, "rows": [asdict(r) for r in keep + new]}, indent=1))
    tmp.replace(path)


def _key(r: Row) -> tuple:
    return (r.gpu, r.height, r.width, r.steps, r.codecs, r.batching, r.precision, r.text_encoder)


def measured_note() -> str:
    return f"{time.strftime('%Y-%m-%d')} torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------
# Estimating
# ------------------------------------------------------------------------------------------------
def codecs_name(settings: StreamSettings) -> str:
    if settings.decoder == "taehv":
        return "taehv" if settings.encoder == "taehv" or settings.mode == "text" else "fast"
    return "wan"


def estimate(
    rows: list[Row], gpu: str, settings: StreamSettings, precision: str, text_encoder: str
) -> Estimate | None:
    """Scaled from the nearest row of this GPU with the same codecs, batching, precision and text-encoder
    placement (nearest: pixels on a log scale, then steps); None when there is none."""
    same = [
        r
        for r in rows
        if r.gpu == gpu
        and (r.codecs, r.batching, r.precision, r.text_encoder)
        == (codecs_name(settings), settings.batching, precision, text_encoder)
    ]
    if not same:
        return None
    pixels, steps = settings.height * settings.width, len(settings.denoising_steps)
    lanes = steps if settings.batching == "stream" else 1
    row = min(same, key=lambda r: (abs(math.log(pixels / (r.height * r.width))), abs(r.steps - steps)))
    stream = max(0.0, row.peak_gib - row.models_gib) * (pixels * lanes) / (row.height * row.width * row.lanes)
    fps = row.fps * (row.height * row.width * row.steps) / (pixels * steps)
    return Estimate(memory_gib=row.models_gib + stream, stream_gib=stream, fps=fps, basis=row)


def preflight(
    components: Components,
    settings: StreamSettings,
    *,
    rows: list[Row] | None = None,
    gpu: str | None = None,
    free_bytes: int | None = None,
) -> Fit:
    """Will a stream of `settings` fit this device now? `gpu` and `free_bytes` default to the device's own
    (tests pass fakes); on the CPU there is nothing to check."""
    device = components.device
    if device.type != "cuda" and (gpu is None or free_bytes is None):
        return Fit("ok", "")
    gpu = gpu if gpu is not None else torch.cuda.get_device_name(device)
    free = free_bytes if free_bytes is not None else free_device_bytes(device)
    est = estimate(
        load_rows() if rows is None else rows, gpu, settings, components.precision, components.text_placement
    )
    size = f"{settings.width}x{settings.height}, {len(settings.denoising_steps)} step(s)"
    if est is None:
        kv = cache_config(components, settings).nbytes(torch.finfo(components.dtype).bits // 8)
        if kv > free:
            return Fit(
                "refuse",
                f"{size} needs {kv / GiB:.1f} GiB for its KV cache alone and this GPU has "
                f"{free / GiB:.1f} GiB free: try {what_to_lower(settings)}",
            )
        return Fit(
            "ok",
            f"no measured estimates for {gpu} (run `wanstream bench --write-estimates`); only the KV cache "
            f"({kv / GiB:.1f} GiB of {free / GiB:.1f} GiB free) was checked",
        )
    need = est.stream_gib * GiB
    if need > REFUSE_FRACTION * free:
        return Fit(
            "refuse",
            f"{size} would not fit: {est.describe()}; this GPU has {free / GiB:.1f} GiB free. Try "
            f"{what_to_lower(settings)}",
            est,
        )
    if need > WARN_FRACTION * free:
        return Fit(
            "warn",
            f"{size} may not fit: {est.describe()}; this GPU has {free / GiB:.1f} GiB free",
            est,
        )
    return Fit("ok", f"{size}: {est.describe()}", est)


def check(components: Components, settings: StreamSettings, **kwargs: object) -> Fit:
    """`preflight`, raising WontFit when refused; the Fit otherwise (a warning is the caller's to show)."""
    fit = preflight(components, settings, **kwargs)  # type: ignore[arg-type]
    if fit.level == "refuse":
        raise WontFit(fit.message)
    return fit
