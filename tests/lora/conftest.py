from __future__ import annotations

import pytest

from wanstream.models.dit import WanDiT

from support.lora_files import tiny_dit


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_on_one_thread(one_torch_thread: None) -> None:
    """Every module here runs tiny models: on one torch thread (tests/conftest.py says why)."""


@pytest.fixture
def dit() -> WanDiT:
    return tiny_dit()
