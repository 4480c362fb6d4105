"""Fixtures: a models folder holding a tiny random Qwen2 instruct model and the demo's umT5-style tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wanstream.engine.random_weights import demo_tokenizer

from support.tiny_instruct import write_tiny_instruct

EXTENDER_DIR = "Qwen2.5-1.5B-Instruct"  # where `wanstream download --with-prompt-extender` puts it
TOKENIZER_DIR = "Wan2.1-T2V-1.3B/google/umt5-xxl"


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_on_one_thread(one_torch_thread: None) -> None:
    """Every module here runs tiny models: on one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_instruct(tmp_path_factory.mktemp("tiny-instruct") / EXTENDER_DIR)


@pytest.fixture
def models_dir(tmp_path: Path, tiny_instruct: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A models folder with the extender and the umT5 tokenizer (the pipeline itself is not needed)."""
    root = tmp_path / "models"
    shutil.copytree(tiny_instruct, root / EXTENDER_DIR)
    demo_tokenizer().save_pretrained(root / TOKENIZER_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the default prompt cache
    monkeypatch.delenv("WANSTREAM_MODELS_DIR", raising=False)
    monkeypatch.delenv("WANSTREAM_EXTENDER_API_KEY", raising=False)
    return root
