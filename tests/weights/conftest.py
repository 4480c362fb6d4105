"""Fixtures for the weights tests: a populated fake hub reached through HF_ENDPOINT, a clean env."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakehub import FakeHub, populate_streamdiffusionv2, streamdiffusionv2_files

from wanstream.weights import registry

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.fixture(scope="session")
def hub_files() -> dict[tuple[str, str], bytes]:
    """The tiny official-layout files, built once per session."""
    return streamdiffusionv2_files(GOLDEN)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user token, cache, models dir or offline flag leaks in; the hub is HTTP only (no Xet)."""
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
        "WANSTREAM_MODELS_DIR",
        "WANSTREAM_LORA_DIR",
        "WANSTREAM_ALLOW_PICKLE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def hub(hub_files: dict, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake hub holding every registry file, with the registry's pins set to its hashes."""
    from huggingface_hub import constants

    fake = FakeHub().start()
    try:
        populate_streamdiffusionv2(fake, GOLDEN, hub_files)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        # Small chunks so a body cut mid-file leaves whole chunks on disk to resume from (the hub's
        # default is 10 MB, larger than our tiny files).
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
        repin(monkeypatch, fake)
        yield fake
    finally:
        fake.stop()


def repin(monkeypatch: pytest.MonkeyPatch, fake: FakeHub, **overrides: str | None) -> None:
    """Point the registry's sha256 pins at the fake hub's files (or at `overrides[key]`)."""
    pipeline = registry.PIPELINES["streamdiffusionv2"]
    artifacts = []
    for a in pipeline.artifacts:
        if a.key in overrides:
            a = dataclasses.replace(a, sha256=overrides[a.key])
        elif a.sha256 is not None:
            a = dataclasses.replace(a, sha256=fake.file(a.repo_id, a.path).sha256)
        artifacts.append(a)
    monkeypatch.setitem(
        registry.PIPELINES, "streamdiffusionv2", dataclasses.replace(pipeline, artifacts=tuple(artifacts))
    )


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"
