"""The LoRA library (`wanstream lora add/list/remove`) against a loopback fake hub and a fake web server.

Real downloads over HTTP on 127.0.0.1: huggingface_hub for hf:// links, CivitAI's API shape for civitai:ID,
plain links with Range resume; every kept file checked against Wan2.1-T2V-1.3B's real layer shapes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from fakehub import FakeHub, _safetensors_bytes
from fakeweb import FakeWeb

from wanstream.cli.main import main
from wanstream.weights.download import DownloadError, IntegrityError
from wanstream.weights.lora_library import LoraLibrary, LoraLibraryError, parse_source, wan_1_3b_targets

REPO = "someone/wan-loras"
META = {
    "modelspec.trigger_phrase": "inkstyle, bold lines",
    "ss_tag_frequency": json.dumps({"10_ink": {"ink drawing": 12, "portrait": 5, "bold lines": 3}}),
    "ss_base_model_version": "wan2.1_t2v_1.3b",
}


def lora_bytes(
    layers: int = 4, *, dim: int = 1536, rank: int = 2, seed: int = 0, meta: dict | None = None
) -> bytes:
    """A kohya-style LoRA for the first `layers` self-attention q/k of a DiT of width `dim`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        key = f"lora_unet_blocks_{i // 2}_self_attn_{'qk'[i % 2]}"
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g).half()
        sd[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g).half()
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return _safetensors_bytes(sd, meta)


@pytest.fixture(scope="module", autouse=True)
def targets() -> None:
    wan_1_3b_targets()  # built once (the 1.3B DiT on the meta device)


@pytest.fixture
def hub(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.stop()


@pytest.fixture
def web(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> FakeWeb:
    with FakeWeb() as fake:
        monkeypatch.setenv("WANSTREAM_CIVITAI_ENDPOINT", fake.url)
        monkeypatch.delenv("CIVITAI_TOKEN", raising=False)
        yield fake


@pytest.fixture
def library(tmp_path: Path) -> LoraLibrary:
    return LoraLibrary(tmp_path / "loras")


def installed(library: LoraLibrary) -> list[str]:
    return sorted(p.relative_to(library.root).as_posix() for p in library.root.rglob("*") if p.is_file())


def test_an_hf_link_is_downloaded_verified_checked_and_recorded(hub: FakeHub, library: LoraLibrary) -> None:
    data = lora_bytes(meta=META)
    hub.add_file(REPO, "styles/ink.safetensors", data)
    seen: list[tuple[int, int | None]] = []
    record = library.add(f"hf://{REPO}/styles/ink.safetensors", on_progress=lambda d, t: seen.append((d, t)))

    assert (library.root / "ink.safetensors").read_bytes() == data
    assert installed(library) == ["ink.safetensors", "ink.safetensors.source.json"]
    assert record.sha256 == hashlib.sha256(data).hexdigest() and record.verified_against == "hub"
    assert record.bytes == len(data) and record.layers == 4 and record.ranks == [2]
    assert record.trigger_words == ["inkstyle", "bold lines"]
    assert record.tags[:2] == ["ink drawing", "portrait"]
    assert seen and seen[-1] == (len(data), len(data))
    [entry] = library.entries()
    assert (
        entry["name"] == "ink.safetensors"
        and entry["provenance"]["source"] == f"hf://{REPO}/styles/ink.safetensors"
    )
    assert entry["provenance"]["added"].endswith("+00:00")


def test_gated_repos_take_hf_token_and_offline_mode_downloads_nothing(
    hub: FakeHub, library: LoraLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_file(REPO, "ink.safetensors", lora_bytes())
    hub.repos[REPO].gated = True
    with pytest.raises(DownloadError, match="HF_TOKEN"):
        library.add(f"hf://{REPO}/ink.safetensors")
    monkeypatch.setenv("HF_TOKEN", FakeHub.GOOD_TOKEN)
    assert library.add(f"hf://{REPO}/ink.safetensors").verified_against == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    with pytest.raises(LoraLibraryError, match="HF_HUB_OFFLINE"):
        library.add(f"hf://{REPO}/ink.safetensors", name="again.safetensors")
    assert len(hub.requests) == before


def test_a_dropped_connection_resumes_with_a_range_request(hub: FakeHub, library: LoraLibrary) -> None:
    data = lora_bytes(layers=16)
    hub.add_file(REPO, "big.safetensors", data)
    hub.cut_once.add(f"{REPO}/big.safetensors")
    library.add(f"hf://{REPO}/big.safetensors")
    gets = hub.blob_gets(REPO, "big.safetensors")
    assert len(gets) == 2 and "range" not in gets[0].headers
    assert gets[1].headers["range"].startswith("bytes=") and gets[1].headers["range"] != "bytes=0-"
    assert (library.root / "big.safetensors").read_bytes() == data


def test_an_interrupted_add_is_resumed_by_the_next(hub: FakeHub, library: LoraLibrary) -> None:
    data = lora_bytes(layers=16)
    hub.add_file(REPO, "big.safetensors", data)
    hub.cut_once.add(f"{REPO}/big.safetensors")
    hub.fail_after_cut = True  # every retry in this run fails
    with pytest.raises(DownloadError, match="partial file is kept"):
        library.add(f"hf://{REPO}/big.safetensors")
    assert not (library.root / "big.safetensors").exists()
    part = library.root / ".partial" / "big.safetensors.part"
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    hub.fail_after_cut = False
    hub._cut_done.clear()
    library.add(f"hf://{REPO}/big.safetensors")
    assert hub.blob_gets(REPO, "big.safetensors")[-1].headers["range"] == f"bytes={kept}-"
    assert (library.root / "big.safetensors").read_bytes() == data
    assert not part.exists()


def test_a_hash_mismatch_installs_nothing(hub: FakeHub, library: LoraLibrary) -> None:
    hub.add_file(REPO, "ink.safetensors", lora_bytes())
    hub.corrupt.add(f"{REPO}/ink.safetensors")
    with pytest.raises(IntegrityError, match="SHA-256"):
        library.add(f"hf://{REPO}/ink.safetensors")
    assert [p for p in installed(library) if not p.startswith(".partial/")] == []
    assert not (library.root / ".partial" / "ink.safetensors.part").exists()


def test_files_that_do_not_fit_the_1_3b_model_are_refused(hub: FakeHub, library: LoraLibrary) -> None:
    hub.add_file(REPO, "wan14b.safetensors", lora_bytes(dim=5120))
    hub.add_file(REPO, "notalora.safetensors", _safetensors_bytes({"model.weight": torch.zeros(3, 3)}))
    hub.add_file(REPO, "page.safetensors", b"<!doctype html><html>Sign in</html>", lfs=True)
    with pytest.raises(LoraLibraryError, match=r"(?s)does not fit Wan2\.1-T2V-1\.3B.*shape mismatch"):
        library.add(f"hf://{REPO}/wan14b.safetensors")
    with pytest.raises(LoraLibraryError, match="does not fit"):
        library.add(f"hf://{REPO}/notalora.safetensors")
    with pytest.raises(LoraLibraryError, match="not a readable safetensors"):
        library.add(f"hf://{REPO}/page.safetensors")
    hub.add_file(REPO, "ink.pt", b"pickle")
    with pytest.raises(LoraLibraryError, match="only safetensors"):
        library.add(f"hf://{REPO}/ink.pt")
    assert [p for p in installed(library) if not p.startswith(".partial/")] == []
    assert library.entries() == []


def test_name_collisions(hub: FakeHub, library: LoraLibrary) -> None:
    hub.add_file(REPO, "a/ink.safetensors", lora_bytes(seed=1))
    hub.add_file(REPO, "b/ink.safetensors", lora_bytes(seed=2))
    first = library.add(f"hf://{REPO}/a/ink.safetensors")
    gets = len(hub.requests)
    again = library.add(f"hf://{REPO}/a/ink.safetensors")  # the same file: nothing to do
    assert again.sha256 == first.sha256
    assert not any(r.method == "GET" and "/cdn/" in r.path for r in hub.requests[gets:])
    with pytest.raises(
        LoraLibraryError, match=r"already in .*from hf://someone/wan-loras/a/ink\.safetensors"
    ):
        library.add(f"hf://{REPO}/b/ink.safetensors")
    assert (library.root / "ink.safetensors").read_bytes() == hub.file(REPO, "a/ink.safetensors").content
    other = library.add(f"hf://{REPO}/b/ink.safetensors", name="ink-b.safetensors")
    assert other.name == "ink-b.safetensors"
    assert [e["name"] for e in library.entries()] == ["ink-b.safetensors", "ink.safetensors"]


def test_names_cannot_leave_the_folder(web: FakeWeb, library: LoraLibrary, tmp_path: Path) -> None:
    web.files["ink.safetensors"] = lora_bytes()
    link = web.file_url("ink.safetensors")
    for bad in ("../evil.safetensors", "sub/evil.safetensors", ".hidden.safetensors", "a\\b.safetensors",
                "/tmp/evil.safetensors", "evil.pt", ""):  # fmt: skip
        with pytest.raises(LoraLibraryError, match="invalid LoRA name"):
            library.add(link, name=bad)
    # A link whose file name climbs out: only its last part is used.
    web.files["../../evil.safetensors"] = lora_bytes()
    record = library.add(f"{web.url}/files/..%2F..%2Fevil.safetensors")
    assert record.name == "evil.safetensors" and (library.root / "evil.safetensors").is_file()
    assert not (tmp_path / "evil.safetensors").exists()
    # Removing: names are confined to the folder too.
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"keep me")
    for bad in ("../outside.safetensors", str(outside)):
        with pytest.raises(LoraLibraryError):
            library.remove(bad)
    assert outside.read_bytes() == b"keep me"
    library.remove("evil.safetensors")
    assert not (library.root / "evil.safetensors").exists()
    assert not (library.root / "evil.safetensors.source.json").exists()


def test_civitai_versions_use_the_api_token_and_published_hash(
    web: FakeWeb, library: LoraLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = lora_bytes()
    web.files["Ink_Wan13B.safetensors"] = data
    web.versions["1234"] = {
        "id": 1234,
        "baseModel": "Wan Video 1.3B t2v",
        "trainedWords": ["inkstyle", "ink drawing"],
        "files": [{"name": "Ink_Wan13B.safetensors", "primary": True, "sizeKB": len(data) / 1024,
                   "hashes": {"SHA256": hashlib.sha256(data).hexdigest().upper()}}],
    }  # fmt: skip
    web.token = "civ-secret"
    with pytest.raises(LoraLibraryError, match="CIVITAI_TOKEN"):
        library.add("civitai:1234")
    monkeypatch.setenv("CIVITAI_TOKEN", "civ-secret")
    record = library.add("civitai:1234")
    assert record.name == "Ink_Wan13B.safetensors" and record.verified_against == "civitai"
    assert record.trigger_words == ["inkstyle", "ink drawing"] and record.base_model == "Wan Video 1.3B t2v"
    assert record.url.endswith("/api/download/models/1234")
    assert (library.root / "Ink_Wan13B.safetensors").read_bytes() == data
    # A file that differs from CivitAI's published hash is not kept.
    web.versions["99"] = {
        **web.versions["1234"],
        "files": [{**web.versions["1234"]["files"][0], "hashes": {"SHA256": "0" * 64}}],
    }
    with pytest.raises(IntegrityError):
        library.add("civitai:99", name="other.safetensors")
    assert not (library.root / "other.safetensors").exists()
    with pytest.raises(LoraLibraryError, match="no model version"):
        library.add("civitai:555")


def test_plain_links_resume_and_are_size_limited(web: FakeWeb, tmp_path: Path) -> None:
    data = lora_bytes(layers=16)
    web.files["style.safetensors"] = data
    web.cut_once.add("style.safetensors")
    library = LoraLibrary(tmp_path / "loras")
    record = library.add(web.file_url("style.safetensors"))
    gets = web.gets("style.safetensors")
    assert len(gets) == 2 and gets[1]["range"] == f"bytes={len(data) // 2}-"
    assert record.verified_against == "none" and record.sha256 == hashlib.sha256(data).hexdigest()
    small = LoraLibrary(tmp_path / "small", max_bytes=len(data) - 1)
    with pytest.raises(LoraLibraryError, match="more than"):
        small.add(web.file_url("style.safetensors"))
    assert not any(p.is_file() for p in (tmp_path / "small").rglob("*"))


def test_a_partial_file_of_a_changed_link_is_not_resumed(web: FakeWeb, library: LoraLibrary) -> None:
    web.files["style.safetensors"] = lora_bytes(layers=16, seed=1)
    web.cut_once.add("style.safetensors")
    web.fail_after_cut = True
    with pytest.raises(DownloadError, match="partial file is kept"):
        library.add(web.file_url("style.safetensors"))
    assert (library.root / ".partial" / "style.safetensors.part").stat().st_size > 0
    new = lora_bytes(layers=16, seed=2)  # the link now serves another file
    web.files["style.safetensors"] = new
    web.fail_after_cut = False
    record = library.add(web.file_url("style.safetensors"))
    last = web.gets("style.safetensors")[-1]
    assert last["if-range"].startswith('"') and last["range"].startswith(
        "bytes="
    )  # resumed only if unchanged
    assert (library.root / "style.safetensors").read_bytes() == new
    assert record.sha256 == hashlib.sha256(new).hexdigest()


def test_a_cancelled_add_keeps_its_partial_file(web: FakeWeb, library: LoraLibrary) -> None:
    web.files["style.safetensors"] = lora_bytes()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LoraLibraryError, match="cancelled"):
        library.add(web.file_url("style.safetensors"), cancel=cancel)
    assert not (library.root / "style.safetensors").exists()


def test_links_are_parsed_strictly() -> None:
    assert parse_source("hf://a/b/c/d.safetensors@v2").repo_path == "c/d.safetensors"
    assert parse_source("hf://a/b/d.safetensors@v2").revision == "v2"
    assert parse_source("https://civitai.com/api/download/models/42").version_id == "42"
    assert parse_source("https://civitai.com/models/7/name?modelVersionId=43").version_id == "43"
    assert parse_source("http://127.0.0.1:8/x.safetensors").kind == "https"
    for bad in (
        "http://example.com/x.safetensors",
        "ftp://x/y",
        "hf://a/b",
        "hf://a/../b/c",
        "file:///etc/passwd",
    ):
        with pytest.raises(LoraLibraryError):
            parse_source(bad)


def test_cli_lora_add_list_remove(
    web: FakeWeb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    web.files["ink.safetensors"] = lora_bytes(meta=META)
    folder = tmp_path / "loras"
    monkeypatch.setenv("WANSTREAM_LORA_DIR", str(folder))
    assert main(["lora", "add", web.file_url("ink.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "added ink.safetensors" in out and "trigger words: inkstyle, bold lines" in out
    assert main(["lora", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed["loras"]] == ["ink.safetensors"]
    assert listed["loras"][0]["provenance"]["source"] == web.file_url("ink.safetensors")
    assert main(["lora", "add", web.file_url("ink.safetensors"), "--name", "../x.safetensors"]) == 2
    assert main(["lora", "remove", "ink.safetensors"]) == 0
    assert main(["lora", "remove", "ink.safetensors"]) == 2
    monkeypatch.delenv("WANSTREAM_LORA_DIR")
    assert main(["lora", "list"]) == 2
    assert "WANSTREAM_LORA_DIR" in capsys.readouterr().err
