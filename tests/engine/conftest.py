from __future__ import annotations

import pytest

from wanstream import Pipeline


@pytest.fixture(scope="session")
def demo_pipeline() -> Pipeline:
    return Pipeline.demo()
