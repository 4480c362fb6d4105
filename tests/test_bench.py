"""`wanstream bench` cannot rot: a tiny CPU run through the CLI produces every figure."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from wanstream.bench.single import BenchConfig, dit_flops, vace_flops
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


def test_bench_vace_column_on_tiny_random_weights(tmp_path: Path) -> None:
    """The product's VACE path (text mode, the input as control frames) against the same stream without VACE."""
    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "--tiny", "--device", "cpu", "--configs", "nobatch,32x48,2,text;nobatch,32x48,2,vace",
         "--chunks", "2", "--warm-chunks", "1", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    text, vace = data["results"]
    assert (text["config"], vace["config"]) == ("nobatch,32x48,2,text", "nobatch,32x48,2,vace")
    for r in (text, vace):
        assert r["fps"] > 0 and r["chunk_ms_p50"] > 0 and r["ttff_ms"] > 0 and r["dit_tflops"] > 0
        assert r["dit_ms_p50"] > 0 and r["decode_ms_p50"] > 0
        assert math.isnan(r["encode_ms_p50"])  # text mode: no input video is encoded
    assert vace["vace_encode_ms_p50"] > 0 and math.isnan(text["vace_encode_ms_p50"])
    assert data["fallbacks"] == {"counts": {}, "last": {}}


def test_vace_flops_count_every_vace_block_on_the_padded_chunk() -> None:
    cfg = WanConfig.t2v_1_3b()
    d = cfg.dim
    one, two = vace_flops(cfg, 1, 1560), vace_flops(cfg, 2, 1560)
    block = two - one
    # A Wan block with self-attention over the chunk's 1560 tokens padded to 1664, plus after_proj.
    dense = dit_flops(cfg, 1, 1560, 1664) - dit_flops(dataclasses.replace(cfg, num_layers=0), 1, 1560, 1664)
    assert math.isclose(block, dense / cfg.num_layers + 1560 * 2 * d * d)
    assert one > block  # the patch embedding and before_proj come once


def test_config_syntax_and_errors() -> None:
    cfg = BenchConfig.parse("batch,480x832,2,wan")
    assert (cfg.batching, cfg.height, cfg.width, cfg.steps, cfg.codecs) == ("stream", 480, 832, 2, "wan")
    vace = BenchConfig.parse("nobatch,480x832,2,vace")
    assert vace.text_mode and vace.settings().mode == "text" and vace.settings().cache_context == "clean"
    with pytest.raises(ValueError, match="use nobatch"):
        BenchConfig.parse("batch,480x832,2,vace")
    for bad in ("batch,480x832,2", "sometimes,480x832,2,wan", "batch,480x832,9,wan", "batch,480x832,2,jpeg"):
        try:
            BenchConfig.parse(bad)
        except ValueError as exc:
            assert "mode,HxW,steps,codecs" in str(exc)
        else:
            raise AssertionError(bad)


def test_bench_refuses_what_it_cannot_measure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    base = ["bench", "--tiny", "--device", "cpu"]
    assert main([*base, "--chunks", "0"]) == 2
    assert "measure 1 or more chunks" in capsys.readouterr().err
    assert main([*base, "--warm-chunks", "-1"]) == 2
    assert "0 or more warm-up chunks" in capsys.readouterr().err
    assert main([*base, "--memory-limit-gib", "0"]) == 2
    captured = capsys.readouterr()
    assert "--memory-limit-gib 0" in captured.err and "positive size" in captured.err
    assert "error" not in captured.out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--tiny", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--device", "gpu0"]) == 2
    assert "not a torch device" in capsys.readouterr().err


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
    for name, phase in live["phases"].items():  # each chunk's stages and eager calls, beside its time
        assert len(phase["stage_ms"]) == len(phase["eager_calls"]) == len(phase["chunk_ms"])
        # (a push that only fills the next chunk runs no stage; one whose frames are still in the lanes, no decode)
        assert all(set(st) <= {"encode", "dit", "decode"} for st in phase["stage_ms"]), name
        assert sum("dit" in st for st in phase["stage_ms"]) >= len(phase["chunk_ms"]) - 1, name
        worst = max(range(len(phase["chunk_ms"])), key=phase["chunk_ms"].__getitem__)
        want = {**phase["stage_ms"][worst], "eager_calls": 0}  # nothing compiled here: no eager stand-ins
        assert live["worst_chunk_stages"][name] == want
        assert sum(phase["stage_ms"][worst].values()) <= phase["chunk_ms"][worst] + 1.0
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


def test_compile_seconds_split_a_compile_into_its_phases() -> None:
    """What bench reports for the first chunk (where a warm-cache start goes): the compile phases that grew
    across a call, largest first — here a real torch.compile on the CPU; nothing when nothing compiles."""
    import torch

    from wanstream.bench.single import compile_seconds, compile_seconds_since

    before = compile_seconds()
    fn = torch.compile(lambda x: (x.sin() * 2).sum(-1), dynamic=False)
    fn(torch.randn(3, 5))
    grown = compile_seconds_since(before)
    assert grown and all(v > 0 for v in grown.values())
    assert list(grown.values()) == sorted(grown.values(), reverse=True) and len(grown) <= 6
    again = compile_seconds()
    fn(torch.randn(3, 5))  # compiled already: no phase grows
    assert compile_seconds_since(again) == {}
