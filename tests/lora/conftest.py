from __future__ import annotations

import pytest

from wanstream.models.dit import WanDiT

from support.lora_files import tiny_dit


@pytest.fixture
def dit() -> WanDiT:
    return tiny_dit()
