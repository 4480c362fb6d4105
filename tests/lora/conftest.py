from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from wanstream.models.dit import WanDiT

from support.lora_files import tiny_dit


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast, and does not stall when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dit() -> WanDiT:
    return tiny_dit()
