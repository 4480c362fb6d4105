"""`wanstream generate --extend-prompts`: each prompt extended once (cached), the extended text used and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanstream.cli.main import main
from wanstream.engine.random_weights import demo_tokenizer
from wanstream.models.text import PromptTokenizer
from wanstream.prompting.backends import build_extender


def timeline(path: Path) -> Path:
    """Three segments, two with the same prompt (extended once)."""
    prompts = ["a red fox in snow", "a cartoon dog jumping and then running", "a red fox in snow"]
    data = {
        "version": "2.1",
        "prompts": [
            {"startTime": i * 0.5, "endTime": (i + 1) * 0.5, "prompts": [{"text": t, "weight": 1}]}
            for i, t in enumerate(prompts)
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_generate_extends_each_prompt_once_and_records_it(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = tmp_path / "stats.json"
    argv = [
        "generate", "--demo", "--mode", "text", "--frames", "24", "--fps", "16", "--seed", "7",
        "--timeline", str(timeline(tmp_path / "t.json")), "--extend-prompts", "--models-dir", str(models_dir),
        "-o", str(tmp_path / "out.mp4"), "--stats-json", str(stats),
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("extended: ") == 2  # two distinct prompts
    data = json.loads(stats.read_text())
    records = data["extended_prompts"]
    assert [r["segment"] for r in records] == [0, 1, 2]
    assert [r["prompt"] for r in records] == ["a red fox in snow", "a cartoon dog jumping and then running",
                                              "a red fox in snow"]  # fmt: skip
    assert records[0]["extended"] == records[2]["extended"]
    # Each distinct prompt was extended and cached under its own text (random weights may answer alike).
    extender = build_extender(models_dir=models_dir, tokenizer=PromptTokenizer(demo_tokenizer()))
    for r in records:
        cached = extender.extend(r["prompt"], seed=7)
        assert cached.cached and cached.text == r["extended"]
    assert all(
        r["seed"] == 7 and r["model"].startswith("local:") and r["umt5_tokens"] <= 512 for r in records
    )
    assert not any(r["cached"] for r in records)
    # The extended texts are what the run used.
    used = [p["text"] for switch in data["prompt_switches"] for p in switch["prompts"]]
    assert used and set(used) <= {r["extended"] for r in records}
    assert "a red fox in snow" not in used
    # A second run takes them from the cache.
    assert main(argv) == 0
    again = json.loads(stats.read_text())["extended_prompts"]
    assert all(r["cached"] for r in again) and [r["extended"] for r in again] == [
        r["extended"] for r in records
    ]


def test_generate_says_how_to_get_a_missing_extender(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "generate", "--demo", "--mode", "text", "--frames", "8", "--prompt", "a fox", "--extend-prompts",
        "--models-dir", str(tmp_path / "empty"), "-o", str(tmp_path / "out.mp4"),
    ]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--with-prompt-extender" in err
    assert not (tmp_path / "out.mp4").exists()
