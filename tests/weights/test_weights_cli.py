"""`wanstream download` and `wanstream models` as a user runs them (fake hub behind HF_ENDPOINT)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeHub

from wanstream.cli.main import build_parser, main


def test_both_commands_are_registered_and_light_to_import() -> None:
    help_text = build_parser().format_help()
    assert "download" in help_text and "models" in help_text
    probe = (
        "import sys, wanstream.cli.download_cmd, wanstream.cli.models_cmd; "
        "print([m for m in ('torch', 'huggingface_hub', 'rich') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_download_then_download_again(
    hub: FakeHub, models_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["download", "--models-dir", str(models_dir), "--with-taehv"]) == 0
    out = capsys.readouterr().out
    assert "To download into" in out and "Autoencoders/taew2_1.pth" in out and "Downloaded 9 files" in out
    assert (models_dir / "Autoencoders/taew2_1.pth").is_file()

    assert main(["download", "--models-dir", str(models_dir), "--with-taehv"]) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_download_errors_exit_1_with_the_reason_on_stderr(
    hub: FakeHub, models_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "--models-dir", str(models_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: HF_HUB_OFFLINE is set") and "wanstream download --models-dir" in err
    assert hub.requests == []


def test_download_into_a_folder_that_cannot_be_made_says_so(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    assert main(["download", "--models-dir", str(in_the_way / "models")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to the models folder {in_the_way / 'models'}")
    assert "choose another --models-dir" in err and hub.requests == []


def test_models_on_a_file_names_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a folder")
    for argv in (["models", "--models-dir", str(a_file)], ["models", "--models-dir", str(a_file), "--json"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert f"error: the models folder {a_file} (--models-dir) is a file, not a folder" in captured.err
        assert "Not ready" not in captured.out and "download" not in captured.out
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(a_file))
    assert main(["models"]) == 2
    assert "(WANSTREAM_MODELS_DIR) is a file" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"


def test_models_lists_presence_sizes_and_loras(
    hub: FakeHub,
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "220")
    assert main(["models", "--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    assert f"Models folder: {models_dir}" in out and "Not ready" in out
    assert f"wanstream download --models-dir {models_dir}" in out
    assert "missing" in out and "~5.7 GB" in out

    main(["download", "--models-dir", str(models_dir)])
    capsys.readouterr()
    lora = tmp_path / "loras"
    lora.mkdir()
    (lora / "style.safetensors").write_bytes(b"0" * 2048)
    monkeypatch.setenv("WANSTREAM_LORA_DIR", str(lora))
    assert main(["models", "--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    assert "Ready" in out and "verified" in out
    assert "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt" in out and "1.7 MB" in out
    assert "not downloaded" in out  # the optional parts
    assert f"LoRA files in {lora}" in out and "style.safetensors  2.0 kB" in out

    assert main(["models", "--models-dir", str(models_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ready"] is True and data["download_command"] is None
    states = {a["key"]: a["state"] for a in data["artifacts"]}
    assert states["generator"] == "verified" and states["taehv"] == "missing"
    assert data["lora_files"] == [{"path": str(lora / "style.safetensors"), "bytes": 2048}]
