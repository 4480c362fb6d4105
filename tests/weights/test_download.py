"""`wanstream download` against a local fake hub: the real download code, real HTTP, loopback only."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fakehub import FakeHub
from rich.console import Console

from conftest import repin
from wanstream.models.dit import WanConfig
from wanstream.weights.dit import load_dit
from wanstream.weights.download import DownloadError, IntegrityError, OfflineError, download
from wanstream.weights.loaders import read_checkpoint
from wanstream.weights.registry import Selection
from wanstream.weights.store import (
    MissingWeightsError,
    Store,
    resolve_pipeline_files,
    resolve_prompt_extender,
)

SDV2 = "jerryfeng/StreamDiffusionV2"
WAN = "Wan-AI/Wan2.1-T2V-1.3B"
GENERATOR = (SDV2, "wan_causal_dmd_v2v/model.pt")
VAE = (WAN, "Wan2.1_VAE.pth")
DEFAULT_FILES = {
    "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt": GENERATOR,
    "Wan2.1-T2V-1.3B/config.json": (WAN, "config.json"),
    "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth": VAE,
    "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth": (WAN, "models_t5_umt5-xxl-enc-bf16.pth"),
    "Wan2.1-T2V-1.3B/google/umt5-xxl/spiece.model": (WAN, "google/umt5-xxl/spiece.model"),
    "Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer.json": (WAN, "google/umt5-xxl/tokenizer.json"),
    "Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer_config.json": (WAN, "google/umt5-xxl/tokenizer_config.json"),
    "Wan2.1-T2V-1.3B/google/umt5-xxl/special_tokens_map.json": (
        WAN,
        "google/umt5-xxl/special_tokens_map.json",
    ),
}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def run(models_dir: Path, selection: Selection | None = None, **kwargs) -> tuple:
    console = quiet()
    report = download(selection or Selection(), models_dir=models_dir, console=console, **kwargs)
    return report, console.file.getvalue()  # type: ignore[attr-defined]


def partial_files(models_dir: Path) -> list[Path]:
    root = models_dir / ".wanstream" / "partial"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_fresh_download_installs_exactly_the_registry_files_verified(hub: FakeHub, models_dir: Path) -> None:
    report, out = run(models_dir)

    assert sorted(report.downloaded) == sorted(DEFAULT_FILES)
    for rel, (repo, path) in DEFAULT_FILES.items():
        assert (models_dir / rel).read_bytes() == hub.file(repo, path).content, rel
        record = Store(models_dir).read_record(rel)
        assert record is not None and record.size == len(hub.file(repo, path).content)
    # Neighbours in the same repos (README, a folder with a similar name) are not fetched.
    fetched = {r.path for r in hub.requests if r.method == "GET"}
    assert not any("README.md" in p or "umt5-xxl-other" in p for p in fetched)
    assert not (models_dir / "Wan2.1-T2V-1.3B" / "README.md").exists()
    assert partial_files(models_dir) == []
    assert "Downloaded 8 files" in out
    # Every status is "verified" and the run-time lookup finds them.
    assert {s.state for s in Store(models_dir).statuses(Selection())} == {"verified"}
    files = resolve_pipeline_files(models_dir=models_dir)
    assert files.text_encoder_format == "bf16"
    assert files.tokenizer == models_dir / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl"
    # The downloaded generator and config are the real formats: they load through the public loader.
    dit = load_dit(files.generator, files.config, dtype=torch.float32)
    assert dit.config == WanConfig.from_json(files.config)
    assert "encoder.conv1.weight" in read_checkpoint(files.vae)


def test_second_run_asks_nothing_and_downloads_nothing(hub: FakeHub, models_dir: Path) -> None:
    run(models_dir)
    before = len(hub.requests)
    report, out = run(models_dir)
    assert len(hub.requests) == before
    assert report.downloaded == [] and len(report.present) == len(DEFAULT_FILES)
    assert "nothing to download" in out


def test_optional_parts_come_with_their_flags(hub: FakeHub, models_dir: Path) -> None:
    report, _ = run(models_dir, Selection(text_encoder="fp8", taehv=True, with_14b=True, vace=True))
    assert set(report.downloaded) >= {
        "WanVideo_comfy/umt5-xxl-enc-fp8_e4m3fn.safetensors",
        "Autoencoders/taew2_1.pth",
        "StreamDiffusionV2/wan_causal_dmd_v2v_14b/model.pt",
        "Wan2.1-T2V-14B/config.json",
        "WanVideo_comfy/Wan2_1-VACE_module_1_3B_bf16.safetensors",
    }
    assert "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth" not in report.downloaded
    files = resolve_pipeline_files(models_dir=models_dir, model_size="14b", taehv=True, vace=True)
    assert files.text_encoder_format == "fp8"
    big = load_dit(files.generator, files.config, dtype=torch.float32)
    assert big.config.num_layers == 3
    fp8 = read_checkpoint(files.text_encoder)
    assert fp8["blocks.0.attn.q.weight"].dtype == torch.float8_e4m3fn


def test_a_connection_dropped_mid_file_is_resumed_with_a_range_request(
    hub: FakeHub, models_dir: Path
) -> None:
    hub.cut_once.add("/".join(GENERATOR))
    run(models_dir)

    data = hub.file(*GENERATOR).content
    assert (models_dir / "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt").read_bytes() == data
    gets = hub.blob_gets(*GENERATOR)
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    start = int(gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start < len(data) and gets[1].status == 206


def test_an_interrupted_run_leaves_a_partial_file_that_the_next_run_continues(
    hub: FakeHub, models_dir: Path
) -> None:
    hub.cut_once.add("/".join(GENERATOR))
    hub.fail_after_cut = True  # the retry inside the run fails too: the run gives up
    with pytest.raises(DownloadError, match="partial file is kept") as err:
        run(models_dir)
    assert "wanstream download --models-dir" in str(err.value)
    final = models_dir / "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt"
    assert not final.exists()  # never a half file at the final path
    (part,) = [p for p in partial_files(models_dir) if p.suffix == ".part"]
    kept = part.stat().st_size
    assert 0 < kept < len(hub.file(*GENERATOR).content)
    status = Store(models_dir).status(Store(models_dir).statuses(Selection())[0].artifact)
    assert status.state == "partial" and status.partial_bytes == kept
    with pytest.raises(MissingWeightsError, match="downloaded so far"):
        resolve_pipeline_files(models_dir=models_dir)

    hub.fail_after_cut = False
    run(models_dir)
    assert final.read_bytes() == hub.file(*GENERATOR).content
    last = hub.blob_gets(*GENERATOR)[-1]
    assert last.headers["range"] == f"bytes={kept}-" and last.status == 206
    assert partial_files(models_dir) == []


def test_a_server_that_ignores_range_restarts_the_file_cleanly(hub: FakeHub, models_dir: Path) -> None:
    hub.cut_once.add("/".join(GENERATOR))
    hub.fail_after_cut = True
    with pytest.raises(DownloadError):
        run(models_dir)
    hub.fail_after_cut, hub.ignore_range = False, True
    run(models_dir)  # the partial bytes are dropped and the whole body is hashed again
    last = hub.blob_gets(*GENERATOR)[-1]
    assert "range" in last.headers and last.status == 200
    final = models_dir / "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt"
    assert final.read_bytes() == hub.file(*GENERATOR).content


def test_a_corrupted_download_is_deleted_and_never_installed(hub: FakeHub, models_dir: Path) -> None:
    hub.corrupt.add("/".join(VAE))
    with pytest.raises(IntegrityError, match=r"Wan2\.1_VAE\.pth.*SHA-256") as err:
        run(models_dir)
    assert "nothing was installed" in str(err.value)
    assert not (models_dir / "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth").exists()
    assert partial_files(models_dir) == []
    # Files verified before the bad one stay installed; a clean retry completes the set.
    assert (models_dir / "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt").is_file()
    hub.corrupt.clear()
    report, _ = run(models_dir)
    assert "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth" in report.downloaded
    assert "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt" in report.present


def test_a_corrupted_small_file_fails_its_git_blob_id(hub: FakeHub, models_dir: Path) -> None:
    hub.corrupt.add(f"{WAN}/config.json")
    with pytest.raises(IntegrityError, match=r"config\.json.*git blob id"):
        run(models_dir)
    assert not (models_dir / "Wan2.1-T2V-1.3B/config.json").exists()


def test_a_hub_file_that_differs_from_the_registry_pin_is_refused_before_download(
    hub: FakeHub, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repin(monkeypatch, hub, vae="0" * 64)
    with pytest.raises(IntegrityError, match="pins 0000"):
        run(models_dir)
    assert hub.blob_gets(*VAE) == []
    assert not models_dir.joinpath("Wan2.1-T2V-1.3B").exists()


def test_a_missing_repository_is_a_clear_404(hub: FakeHub, models_dir: Path) -> None:
    del hub.repos["lightx2v/Autoencoders"]
    with pytest.raises(DownloadError, match=r"lightx2v/Autoencoders: repository not found .*HTTP 404"):
        run(models_dir, Selection(taehv=True))


def test_a_file_missing_from_its_repo_names_the_registry_entry(hub: FakeHub, models_dir: Path) -> None:
    del hub.repos["lightx2v/Autoencoders"].files["taew2_1.pth"]
    with pytest.raises(DownloadError, match=r"has no taew2_1\.pth .*'taehv' is out of date"):
        run(models_dir, Selection(taehv=True))


def test_a_gated_repo_answers_401_until_a_token_is_given(
    hub: FakeHub, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.repos["Kijai/WanVideo_comfy"].gated = True
    with pytest.raises(DownloadError) as err:
        run(models_dir, Selection(text_encoder="fp8"))
    message = str(err.value)
    assert (
        "HTTP 401" in message and "HF_TOKEN" in message and "huggingface.co/Kijai/WanVideo_comfy" in message
    )
    assert not (models_dir / "WanVideo_comfy").exists()

    monkeypatch.setenv("HF_TOKEN", FakeHub.GOOD_TOKEN)
    report, _ = run(models_dir, Selection(text_encoder="fp8"))
    assert "WanVideo_comfy/umt5-xxl-enc-fp8_e4m3fn.safetensors" in report.downloaded
    resolves = [r for r in hub.requests if "/Kijai/WanVideo_comfy/resolve/" in r.path]
    assert resolves[-1].headers["authorization"] == f"Bearer {FakeHub.GOOD_TOKEN}"


def test_offline_mode_uses_present_files_and_names_missing_ones(
    hub: FakeHub, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(models_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)

    report, out = run(models_dir)
    assert report.downloaded == [] and "nothing to download" in out
    assert resolve_pipeline_files(models_dir=models_dir).vae.is_file()

    (models_dir / "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth").unlink()
    with pytest.raises(OfflineError, match=r"(?s)Wan2\.1_VAE\.pth.*Unset HF_HUB_OFFLINE.*wanstream download"):
        run(models_dir)
    with pytest.raises(MissingWeightsError, match=r"(?s)Wan2\.1_VAE\.pth.*wanstream download --models-dir"):
        resolve_pipeline_files(models_dir=models_dir)
    assert len(hub.requests) == before  # offline means no request at all


def test_offline_with_hand_placed_files_accepts_them_unverified(
    hub: FakeHub, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for rel, (repo, path) in DEFAULT_FILES.items():
        (models_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (models_dir / rel).write_bytes(hub.file(repo, path).content)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report, out = run(models_dir)
    assert report.downloaded == [] and "not verified against the hub yet" in out
    assert hub.requests == []


def test_hand_placed_files_are_hashed_and_adopted_not_downloaded(hub: FakeHub, models_dir: Path) -> None:
    target = models_dir / "StreamDiffusionV2/wan_causal_dmd_v2v/model.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(hub.file(*GENERATOR).content)
    report, _ = run(models_dir)
    assert report.adopted == ["StreamDiffusionV2/wan_causal_dmd_v2v/model.pt"]
    assert hub.blob_gets(*GENERATOR) == []
    assert Store(models_dir).is_verified("StreamDiffusionV2/wan_causal_dmd_v2v/model.pt")


def test_a_wrong_file_in_place_is_replaced(hub: FakeHub, models_dir: Path) -> None:
    target = models_dir / "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the vae")
    _, out = run(models_dir)
    assert "it will be replaced" in out
    assert target.read_bytes() == hub.file(*VAE).content


def test_verify_rehashes_and_repairs_a_file_changed_behind_its_record(hub: FakeHub, models_dir: Path) -> None:
    run(models_dir)
    target = models_dir / "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF  # same size, same mtime: the record cannot tell
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report, _ = run(models_dir)
    assert report.downloaded == []
    report, _ = run(models_dir, verify=True)
    assert report.downloaded == ["Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"]
    assert target.read_bytes() == hub.file(*VAE).content


def test_dry_run_lists_the_plan_and_fetches_nothing(hub: FakeHub, models_dir: Path) -> None:
    report, out = run(models_dir, dry_run=True)
    assert len(report.planned) == len(DEFAULT_FILES) and report.downloaded == []
    assert "wan_causal_dmd_v2v/model.pt" in out and "to fetch" in out
    assert [r for r in hub.requests if "/cdn/" in r.path or "/resolve/" in r.path] == []


def test_not_enough_disk_space_is_reported_before_downloading(
    hub: FakeHub, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1))  # type: ignore[attr-defined]
    with pytest.raises(DownloadError, match="not enough disk space"):
        run(models_dir)
    assert [r for r in hub.requests if "/cdn/" in r.path] == []


def test_one_download_per_models_dir_at_a_time(hub: FakeHub, models_dir: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    store = Store(models_dir)
    store.state_dir.mkdir(parents=True)
    with store.lock_path().open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another `wanstream download`"):
            run(models_dir)


def test_records_say_what_each_file_was_verified_against(hub: FakeHub, models_dir: Path) -> None:
    run(models_dir)
    record = json.loads(
        (models_dir / ".wanstream/records/StreamDiffusionV2/wan_causal_dmd_v2v/model.pt.json").read_text()
    )
    assert record["repo_id"] == SDV2 and record["revision"] == hub.repos[SDV2].commit
    assert record["sha256"] == hub.file(*GENERATOR).sha256
    small = json.loads((models_dir / ".wanstream/records/Wan2.1-T2V-1.3B/config.json.json").read_text())
    assert small["git_oid"] == hub.file(WAN, "config.json").blob_id and small["sha256"] is None


def test_the_prompt_extender_comes_with_its_flag(hub: FakeHub, models_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from support.tiny_instruct import write_tiny_instruct

    tiny = write_tiny_instruct(tmp_path / "tiny")
    for f in tiny.iterdir():
        hub.add_file("Qwen/Qwen2.5-1.5B-Instruct", f.name, f.read_bytes())
    hub.add_file("Qwen/Qwen2.5-1.5B-Instruct", "LICENSE", b"Apache-2.0")
    with pytest.raises(
        MissingWeightsError, match=r"(?s)Download them with:.*wanstream download .*--with-prompt-extender"
    ):
        resolve_prompt_extender(models_dir=models_dir)
    report, _ = run(models_dir, Selection(prompt_extender=True))
    folder = resolve_prompt_extender(models_dir=models_dir)
    assert folder == models_dir / "Qwen2.5-1.5B-Instruct"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny.iterdir())  # no LICENSE
    assert {f"Qwen2.5-1.5B-Instruct/{p.name}" for p in tiny.iterdir()} <= set(report.downloaded)
    assert AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).config.hidden_size == 32
