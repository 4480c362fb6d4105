"""`wanstream bench` cannot rot: a tiny CPU run through the CLI produces every figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

from wanstream.bench import BenchConfig, dit_flops
from wanstream.cli.main import main
from wanstream.models.dit import WanConfig


def test_bench_cli_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "--tiny", "--device", "cpu", "--configs", "batch,32x32,2,fast;nobatch,32x32,1,taehv",
         "--chunks", "2", "--warm-chunks", "1", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["results"]] == ["batch,32x32,2,fast", "nobatch,32x32,1,taehv"]
    for r in data["results"]:
        assert r["fps"] > 0 and r["chunk_ms_p50"] > 0 and r["ttff_ms"] > 0
        assert all(r[k] > 0 for k in ("encode_ms_p50", "dit_ms_p50", "decode_ms_p50"))
    assert "RANDOM" in data["weights"] or "random" in data["weights"]


def test_config_syntax_and_errors() -> None:
    cfg = BenchConfig.parse("batch,480x832,2,wan")
    assert (cfg.batching, cfg.height, cfg.width, cfg.steps, cfg.codecs) == ("stream", 480, 832, 2, "wan")
    for bad in ("batch,480x832,2", "sometimes,480x832,2,wan", "batch,480x832,9,wan", "batch,480x832,2,jpeg"):
        try:
            BenchConfig.parse(bad)
        except ValueError as exc:
            assert "mode,HxW,steps,codecs" in str(exc)
        else:
            raise AssertionError(bad)


def test_dit_flop_formula_matches_the_reference_count() -> None:
    # wan_models.md §1.7: 1.3B, one 1560-token frame, window 6 → 4.049 TFLOP dense + 0.4486 per attended frame.
    cfg = WanConfig.t2v_1_3b()
    flops = dit_flops(cfg, 1, 1560, 6 * 1560)
    assert math.isclose(flops / 1e12, 4.049 + 6 * 0.4486, rel_tol=0.01)


def test_bench_live_changes_scenario_runs_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "--tiny", "--device", "cpu", "--configs", "batch,32x32,2,wan", "--chunks", "1",
         "--warm-chunks", "1", "--live-changes", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    live = data["live_changes"]
    assert list(live["phases"]) == ["start", "prompt_change", "hard_cut", "steps_2", "steps_3", "steps_1"]
    assert live["all_phases_produced_frames"]
    assert live["phases"]["hard_cut"]["frames"] == 5 + 4 * 5 - 4  # 5-frame first chunk, then 2-step lag of 1
    assert live["ttff_after_reset_ms"] == live["phases"]["hard_cut"]["chunk_ms"][0] > 0
    assert data["fallbacks"] == {"counts": {}, "last": {}}


def test_bench_with_text_encoder_fp8_and_low_vram(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "--tiny", "--device", "cpu", "--configs", "batch,32x32,2,taehv", "--chunks", "2",
         "--warm-chunks", "1", "--with-text-encoder", "--text-encoder", "fp8", "--precision", "fp8",
         "--memory-limit-gib", "24", "--json", str(out), "--write-estimates", str(tmp_path / "est.json")]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert (data["precision"], data["text_encoder"], data["memory_limit_gib"]) == ("fp8", "fp8", 24.0)
    r = data["results"][0]
    change = r["extra"]["prompt_change"]
    assert change["tokens"] == 64  # the tiny encoder's whole width: the worst case
    assert 0 < change["encode_ms"] < change["to_first_frame_ms"] <= change["to_fully_conditioned_ms"]
    mem = r["extra"]["memory"]
    assert mem["kv_cache_gib"] > 0 and mem["text_encoder_gib"] > 0
    assert not (tmp_path / "est.json").exists()  # rows are per GPU: a CPU run writes none
    # The profile on the CPU: host placement falls back to the device itself, fp8 DiT, TAEHV both ways.
    rc = main(
        ["bench", "--tiny", "--device", "cpu", "--chunks", "1", "--warm-chunks", "1", "--low-vram",
         "--with-text-encoder", "--json", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert rc == 0 and data["precision"] == "fp8" and data["text_encoder"] == "gpu"
    assert {r["config"].rsplit(",", 1)[1] for r in data["results"]} == {"taehv"}
