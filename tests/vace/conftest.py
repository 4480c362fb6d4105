from __future__ import annotations

import dataclasses

import pytest

from wanstream import Pipeline
from wanstream.engine.components import Components
from wanstream.engine.random_weights import randomize_
from wanstream.models.vace import VaceModule


@pytest.fixture(scope="session")
def vace_components() -> Components:
    """The demo pipeline's tiny random networks plus a tiny random VACE module (1 VACE block on layer 0)."""
    components = Pipeline.demo().components
    vace = randomize_(VaceModule(components.dit.config), seed=7).eval().requires_grad_(False)
    return dataclasses.replace(components, vace=vace)
