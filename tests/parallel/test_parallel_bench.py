"""`wanstream bench --gpus N` end to end on CPU processes (tiny networks): what it measures and reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

from wanstream.cli.main import main


def test_bench_gpus_reports_fps_efficiency_and_every_rank(tmp_path: Path, one_torch_thread) -> None:
    out = tmp_path / "ring.json"
    args = ["bench", "--gpus", "2", "--tiny", "--device", "cpu", "--chunks", "3", "--warm-chunks", "1"]
    configs = "batch,32x48,2,taehv;nobatch,32x48,1,taehv;nobatch,32x48,2,taehv"
    assert main([*args, "--configs", configs, "--rebalance", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["gpus"] == 2
    results = {r["config"]: r for r in report["results"]}
    assert set(results) == {"batch,32x48,2,taehv", "nobatch,32x48,1,taehv"}  # nobatch × 2 steps: one GPU only
    for r in results.values():
        assert r["fps"] > 0 and r["fps_one_gpu"] > 0
        assert math.isclose(r["efficiency"], r["fps"] / (2 * r["fps_one_gpu"]))
        assert r["layout"] == [[0, 1], [1, 2]]
        assert [row[0] for row in r["ranks"]] == [0, 1] and all(row[4] > 0 for row in r["ranks"])
        assert r["rebalanced"]["fps"] > 0 and r["ttff_ms"] > 0
        assert r["chunks_measured"] >= 3  # the window's pushes: 3, more if no frame had come out by then


def test_bench_gpus_needs_the_gpus(capsys) -> None:
    import torch

    if torch.cuda.device_count() >= 64:
        return
    assert main(["bench", "--gpus", "64"]) == 2
    assert "CUDA GPU(s)" in capsys.readouterr().err


def test_ring_window_waits_for_late_frames_instead_of_reporting_zero() -> None:
    """CI once saw 0.00 FPS: a rank late for a few chunks on a busy 2-core machine, and a window that counted
    the frames its pushes returned (never waited for). The rate is the pushes' (paced by the full ring), and
    a window goes on until frames come out."""
    import pytest
    import torch

    from wanstream.bench.ring import _Feed, _window

    class LateRing:
        def __init__(self, late: int) -> None:
            self.late, self.pushes = late, 0

        def push(self, frames: torch.Tensor) -> torch.Tensor:
            self.pushes += 1
            return frames if self.pushes > self.late else frames[:0]

    feed = _Feed(torch.zeros(5 + 4 * 2, 2, 2, 3, dtype=torch.uint8))
    ring = LateRing(late=3)
    fps, chunk_ms = _window(ring, feed, chunks=3, most=20)
    assert fps > 0 and ring.pushes == len(chunk_ms) == 4  # 3 pushes without frames: one more, with them
    assert _window(LateRing(late=0), feed, chunks=3, most=20)[0] > 0
    with pytest.raises(RuntimeError, match="gave no frames in 5 chunks"):
        _window(LateRing(late=99), feed, chunks=3, most=5)
