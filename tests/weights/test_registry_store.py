"""The registry as data, the local layout, and run-time lookup of what is present (no network)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wanstream.weights.registry import (
    PIPELINES,
    Selection,
    find_artifact,
    get_pipeline,
    human_bytes,
)
from wanstream.weights.store import (
    MissingWeightsError,
    Store,
    default_models_dir,
    lora_files,
    resolve_models_dir,
    resolve_pipeline_files,
)

SDV2 = get_pipeline("streamdiffusionv2")


def test_registry_entries_are_complete_and_use_the_real_repos() -> None:
    keys = [a.key for a in SDV2.artifacts]
    assert len(keys) == len(set(keys))
    repos = {a.repo_id for a in SDV2.artifacts}
    assert repos == {
        "jerryfeng/StreamDiffusionV2",
        "Wan-AI/Wan2.1-T2V-1.3B",
        "Wan-AI/Wan2.1-T2V-14B",
        "Kijai/WanVideo_comfy",
        "lightx2v/Autoencoders",
        "Qwen/Qwen2.5-1.5B-Instruct",  # the prompt extender (--with-prompt-extender)
    }
    for a in SDV2.artifacts:
        assert a.approx_bytes > 0 and a.description and a.role
        assert a.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", a.sha256)
        assert a.local_dir == a.repo_id.split("/")[1]  # Scope's layout: repo name without owner
    assert SDV2.artifact("generator").path == "wan_causal_dmd_v2v/model.pt"
    assert SDV2.artifact("generator_14b").path == "wan_causal_dmd_v2v_14b/model.pt"
    assert SDV2.artifact("tokenizer").is_folder and SDV2.artifact("tokenizer").folder == "google/umt5-xxl"
    with pytest.raises(ValueError, match="unknown pipeline 'nope'"):
        get_pipeline("nope")


def test_selections_follow_the_download_flags() -> None:
    default = {a.key for a in Selection().artifacts()}
    assert default == {"generator", "config", "vae", "tokenizer", "text_encoder_bf16"}
    full = Selection(text_encoder="fp8", taehv=True, with_14b=True, vace=True)
    assert {a.key for a in full.artifacts()} == default - {"text_encoder_bf16"} | {
        "text_encoder_fp8",
        "taehv",
        "generator_14b",
        "config_14b",
        "vace",
    }
    assert Selection().command() == "wanstream download"
    assert full.command("/data/my models") == (
        "wanstream download --models-dir '/data/my models' --text-encoder fp8 --with-taehv --with-14b --with-vace"
    )
    with pytest.raises(ValueError, match="text encoder"):
        Selection(text_encoder="fp16")  # type: ignore[arg-type]
    extender = Selection(prompt_extender=True)
    extra = {a.path for a in extender.artifacts() if a.role == "prompt_extender"}
    assert extra == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json", "merges.txt"}  # fmt: skip
    assert {a.key for a in extender.artifacts() if a.role != "prompt_extender"} == default
    assert extender.command() == "wanstream download --with-prompt-extender"
    sizes = sum(a.approx_bytes for a in extender.artifacts() if a.role == "prompt_extender")
    assert 3.0e9 < sizes < 3.2e9  # Qwen2.5-1.5B-Instruct in bf16


def test_folder_artifacts_match_only_their_folder() -> None:
    tok = SDV2.artifact("tokenizer")
    assert tok.matches("google/umt5-xxl/spiece.model")
    assert not tok.matches("google/umt5-xxl-other/spiece.model")
    assert not tok.matches("google/umt5-xxl")
    assert tok.local_relpath("google/umt5-xxl/spiece.model") == "Wan2.1-T2V-1.3B/google/umt5-xxl/spiece.model"


def test_find_artifact_recognises_registry_files_by_path() -> None:
    assert find_artifact("/m/Wan2.1-T2V-14B/config.json")[1].key == "config_14b"  # type: ignore[index]
    assert find_artifact("ckpts/wan_causal_dmd_v2v/model.pt")[1].key == "generator"  # type: ignore[index]
    assert find_artifact("whatever/config.json") is None  # ambiguous: 1.3B or 14B
    assert find_artifact("x/model.pt") is None


def test_human_bytes() -> None:
    assert human_bytes(249) == "249 B"
    assert human_bytes(6_731_333_792) == "6.7 GB"
    assert human_bytes(None) == "?"


def test_models_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANSTREAM_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_models_dir() == tmp_path / "cache" / "wanstream" / "models"
    assert resolve_models_dir() == tmp_path / "cache" / "wanstream" / "models"
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "env"))
    assert resolve_models_dir() == tmp_path / "env"
    assert resolve_models_dir(tmp_path / "flag") == tmp_path / "flag"


def place(root: Path, *relpaths: str) -> None:
    for rel in relpaths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 10)


REQUIRED = (
    "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt",
    "Wan2.1-T2V-1.3B/config.json",
    "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
    "Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer.json",
)


def test_resolve_finds_present_files_and_prefers_the_bf16_encoder(tmp_path: Path) -> None:
    place(tmp_path, *REQUIRED, "WanVideo_comfy/umt5-xxl-enc-fp8_e4m3fn.safetensors")
    files = resolve_pipeline_files(models_dir=tmp_path)
    assert files.text_encoder_format == "fp8"
    assert files.generator == tmp_path / REQUIRED[0]
    assert files.tokenizer == tmp_path / "Wan2.1-T2V-1.3B/google/umt5-xxl"
    assert files.taehv is None and files.vace is None

    place(tmp_path, "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth")
    assert resolve_pipeline_files(models_dir=tmp_path).text_encoder_format == "bf16"
    assert resolve_pipeline_files(models_dir=tmp_path, text_encoder="fp8").text_encoder.name.endswith(
        "fp8_e4m3fn.safetensors"
    )
    # Present but unverified (placed by hand): usable, and reported as such.
    assert Store(tmp_path).status(SDV2.artifact("vae")).state == "present"


def test_missing_files_raise_with_the_exact_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANSTREAM_MODELS_DIR", raising=False)
    place(tmp_path, *REQUIRED[1:])
    with pytest.raises(MissingWeightsError) as err:
        resolve_pipeline_files(models_dir=tmp_path, taehv=True)
    message = str(err.value)
    assert f"Missing model files in {tmp_path}" in message
    assert (
        "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt" in message and "Autoencoders/taew2_1.pth" in message
    )
    assert err.value.command == f"wanstream download --models-dir {tmp_path} --with-taehv"
    assert message.endswith(err.value.command)
    assert {a.key for a in err.value.missing} == {"generator", "text_encoder_bf16", "taehv"}

    # With WANSTREAM_MODELS_DIR pointing there, the command needs no --models-dir.
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        resolve_pipeline_files(model_size="14b")
    assert err.value.command == "wanstream download --with-14b"


def test_an_empty_tokenizer_folder_is_missing(tmp_path: Path) -> None:
    place(tmp_path, *REQUIRED[:3], "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth")
    (tmp_path / "Wan2.1-T2V-1.3B/google/umt5-xxl").mkdir(parents=True)
    with pytest.raises(MissingWeightsError, match="google/umt5-xxl"):
        resolve_pipeline_files(models_dir=tmp_path)


def test_lora_files_come_from_the_env_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANSTREAM_LORA_DIR", raising=False)
    assert lora_files() == (None, [])
    place(tmp_path, "style.safetensors", "sub/other.pt", "notes.txt")
    monkeypatch.setenv("WANSTREAM_LORA_DIR", str(tmp_path))
    root, files = lora_files()
    assert root == tmp_path
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["style.safetensors", "sub/other.pt"]


def test_every_pipeline_has_the_roles_the_runtime_needs() -> None:
    for pipeline in PIPELINES.values():
        roles = {(a.role, a.variant) for a in pipeline.artifacts}
        for needed in (("generator", "1.3b"), ("config", "1.3b"), ("vae", None), ("tokenizer", None)):
            assert needed in roles, (pipeline.name, needed)
        assert {v for r, v in roles if r == "text_encoder"} == {"bf16", "fp8"}
