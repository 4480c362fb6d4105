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


def test_bench_gpus_needs_the_gpus(capsys) -> None:
    import torch

    if torch.cuda.device_count() >= 64:
        return
    assert main(["bench", "--gpus", "64"]) == 2
    assert "CUDA GPU(s)" in capsys.readouterr().out
