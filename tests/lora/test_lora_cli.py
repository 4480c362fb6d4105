"""`wanstream generate --lora FILE[:SCALE]`, LoRAs from a timeline's settings, and `wanstream bench --lora-rank`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wanstream.cli.main import main
from wanstream.engine.random_weights import demo_components
from wanstream.jobs.generate import GenerateRequest, plan
from wanstream.media.video import read_video
from wanstream.models.lora import linear_targets

from support.lora_files import lora_state_dict, random_pairs, write_lora


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-loras")
    shapes = linear_targets(demo_components().dit)
    blocks = [name for name in shapes if name.startswith("blocks.")]
    write_lora(root / "style.safetensors", lora_state_dict(random_pairs(shapes, blocks), "kohya"))
    bad = lora_state_dict(random_pairs(shapes, blocks[:2]), "wan-comfy")
    bad["diffusion_model.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(4, 63)  # wrong width
    write_lora(root / "bad.safetensors", bad)
    return root


@pytest.fixture
def env(tmp_path: Path, lora_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "no-models"))  # --demo runs the tiny model
    monkeypatch.setenv("WANSTREAM_LORA_DIR", str(lora_dir))
    return tmp_path


def test_generate_with_loras(env: Path, lora_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, stats = env / "out.mp4", env / "stats.json"
    argv = [
        "generate", "--demo", "--frames", "13", "-o", str(out), "--stats-json", str(stats),
        "--lora", "style.safetensors:0.75", "--lora", str(lora_dir / "style.safetensors") + ":-0.5",
        "--lora-mode", "runtime",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "lora:     style.safetensors at scale 0.75 (runtime)" in capsys.readouterr().err
    assert read_video(out)[0].shape[0] == 13
    settings = json.loads(stats.read_text())["settings"]
    assert [(lo["path"], lo["scale"]) for lo in settings["loras"]] == [
        ("style.safetensors", 0.75),
        (str(lora_dir / "style.safetensors"), -0.5),
    ]
    assert settings["lora_mode"] == "runtime"


@pytest.mark.parametrize(
    ("spec", "phrase", "code"),
    [
        ("missing.safetensors", "not found", 2),  # before any model loads
        ("style.safetensors:12", "less than or equal to 10", 2),
        ("bad.safetensors", "shape mismatch", 2),  # once the model is there: still bad input
    ],
)
def test_generate_rejects_bad_loras_writing_nothing(
    env: Path, spec: str, phrase: str, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = env / "out.mp4"
    assert main(["generate", "--demo", "--frames", "5", "-o", str(out), "--lora", spec]) == code
    assert phrase in capsys.readouterr().err
    assert not out.exists()


def test_a_timelines_loras_apply_and_the_command_line_overrides_them(env: Path) -> None:
    timeline = env / "timeline.json"
    settings = {
        "loras": [{"path": "/elsewhere/style.safetensors", "scale": 0.4, "mergeMode": "runtime_peft"}],
        "loraMergeStrategy": "permanent_merge",
        "manageCache": True,
    }
    timeline.write_text(
        json.dumps(
            {"prompts": [{"startTime": 0, "endTime": 1, "prompts": [{"text": "ink"}]}], "settings": settings}
        )
    )
    job = plan(GenerateRequest(timeline=timeline, output=env / "o.mp4"), demo=True)
    assert job.settings.lora_summary == (("/elsewhere/style.safetensors", 0.4, "runtime"),)
    assert job.settings.lora_mode == "merged" and job.settings.lora_switch == "cut"
    job = plan(
        GenerateRequest(timeline=timeline, output=env / "o.mp4", loras=["style.safetensors"]), demo=True
    )
    assert job.settings.lora_summary == (("style.safetensors", 1.0, "merged"),)


def test_bench_measures_merged_and_runtime_loras(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--tiny", "--device", "cpu", "--configs", "nobatch,32x32,1,taehv", "--chunks", "2",
        "--warm-chunks", "1", "--lora-rank", "4", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["config"] for r in results] == [
        "nobatch,32x32,1,taehv",
        "nobatch,32x32,1,taehv+lora4-merged",
        "nobatch,32x32,1,taehv+lora4-runtime",
    ]
    assert all(r["fps"] > 0 for r in results)
    assert all(r["extra"]["lora_rescale_ms"] > 0 for r in results[1:])
