"""Estimates before a stream: scaled from measured rows, compared with (fake) free memory; the KV fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanstream.engine.denoise.local import cache_config
from wanstream.engine.estimate import (
    TABLE_VERSION,
    Row,
    WontFit,
    check,
    estimate,
    preflight,
    read_rows,
    write_rows,
)
from wanstream.engine.random_weights import demo_components
from wanstream.engine.settings import StreamSettings

GiB = 2**30
GPU = "NVIDIA GeForce RTX 4090"


def row(**kw: object) -> Row:
    base = dict(
        gpu=GPU, height=480, width=832, steps=2, codecs="wan", batching="stream", precision="bf16",
        text_encoder="gpu", peak_gib=17.0, models_gib=3.0, fps=40.0,
    )  # fmt: skip
    return Row(**{**base, **kw})  # type: ignore[arg-type]


ROWS = [row(), row(height=512, width=512, steps=1, peak_gib=8.0, fps=90.0), row(gpu="other", peak_gib=1.0)]


def test_scaling_by_pixels_lanes_and_steps() -> None:
    same = estimate(ROWS, GPU, StreamSettings(height=480, width=832, steps=[700, 500]), "bf16", "gpu")
    assert same is not None and same.basis == ROWS[0]
    assert (same.memory_gib, same.stream_gib, same.fps) == (17.0, 14.0, 40.0)
    # Twice the pixels, same steps: stream memory and time double (nearest row: 480x832, 2 steps).
    big = estimate(ROWS, GPU, StreamSettings(height=960, width=832, steps=[700, 500]), "bf16", "gpu")
    assert big is not None and big.basis == ROWS[0]
    assert big.stream_gib == pytest.approx(28.0) and big.fps == pytest.approx(20.0)
    # 4 steps at 480x832: twice the lanes and twice the steps.
    four = estimate(ROWS, GPU, StreamSettings(steps=[700, 500, 400, 200]), "bf16", "gpu")
    assert four is not None and four.stream_gib == pytest.approx(28.0) and four.fps == pytest.approx(20.0)
    assert "estimate" in four.describe()
    # Other choices (precision, placement, codecs) or another GPU: no basis.
    assert estimate(ROWS, GPU, StreamSettings(), "fp8", "gpu") is None
    assert estimate(ROWS, GPU, StreamSettings(), "bf16", "host") is None
    assert estimate(ROWS, "NVIDIA H100", StreamSettings(), "bf16", "gpu") is None
    assert estimate(ROWS, GPU, StreamSettings(encoder="taehv", decoder="taehv"), "bf16", "gpu") is None


def test_preflight_ok_warn_refuse_against_fake_free_memory() -> None:
    c = demo_components()
    c.text_placement = "gpu"
    settings = StreamSettings(steps=[700, 500])
    ok = preflight(c, settings, rows=ROWS, gpu=GPU, free_bytes=20 * GiB)
    assert ok.level == "ok" and ok.estimate is not None and "estimate" in ok.message
    warn = preflight(c, settings, rows=ROWS, gpu=GPU, free_bytes=14 * GiB)
    assert warn.level == "warn" and "may not fit" in warn.message
    refused = preflight(c, settings, rows=ROWS, gpu=GPU, free_bytes=10 * GiB)
    assert refused.level == "refuse" and "would not fit" in refused.message
    assert "fewer denoising steps" in refused.message and "--low-vram" in refused.message
    with pytest.raises(WontFit, match=r"10\.0 GiB free"):
        check(c, settings, rows=ROWS, gpu=GPU, free_bytes=10 * GiB)


def test_without_a_row_for_this_gpu_only_the_exact_kv_cache_is_checked() -> None:
    c = demo_components()
    settings = StreamSettings(height=480, width=832, steps=[700, 500])
    kv = cache_config(c, settings).nbytes(4)
    fine = preflight(c, settings, rows=ROWS, gpu="NVIDIA A10", free_bytes=kv + 1)
    assert fine.level == "ok" and "no measured estimates for NVIDIA A10" in fine.message
    refused = preflight(c, settings, rows=[], gpu="NVIDIA A10", free_bytes=kv - 1)
    assert refused.level == "refuse" and "KV cache alone" in refused.message


def test_kv_cache_size_matches_what_a_session_allocates() -> None:
    from wanstream.engine.session import StreamSession

    c = demo_components()
    settings = StreamSettings(height=64, width=96, steps=[700, 500])
    cache = StreamSession(c, settings).denoiser.cache
    kv = ("k", "v", "sink_k", "sink_v")
    held = sum(b.numel() * b.element_size() for n, b in cache.named_buffers() if n in kv)
    assert cache_config(c, settings).nbytes(4) == held


def test_cpu_has_nothing_to_check() -> None:
    assert preflight(demo_components(), StreamSettings()).level == "ok"


def test_table_round_trip_replaces_the_same_configuration(tmp_path: Path) -> None:
    path = tmp_path / "est.json"
    write_rows(path, ROWS[:2])
    write_rows(path, [row(fps=41.0)])
    rows = read_rows(path)
    assert len(rows) == 2 and {r.fps for r in rows} == {41.0, 90.0}
    assert json.loads(path.read_text())["version"] == TABLE_VERSION
    path.write_text(json.dumps({"version": 99, "rows": []}))
    with pytest.raises(ValueError, match="version 99"):
        read_rows(path)
