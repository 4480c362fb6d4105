"""Fixtures: one `wanstream serve --demo` subprocess on loopback for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.harness import ServerProcess, serving
from wanstream.media.sample import write_sample_clip


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    write_sample_clip(folder / "sample.mp4", num_frames=48, height=240, width=320)
    return folder


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> Iterator[ServerProcess]:
    """The server tests' demo server (`server` in tests/conftest.py waits for it to be idle)."""
    logs = tmp_path_factory.mktemp("logs")
    with serving(
        "--demo",
        "--media-dir",
        str(media_dir),
        "--max-sessions",
        "2",
        "--max-upload-mb",
        "1",
        "--ice-timeout",
        "3",
        # A loaded CI CPU runs the demo's chunks several times slower than an idle one: sizes the tests use
        # must not be refused as "not real time" (4096×4096 still is: its estimate is in the minutes).
        "--max-chunk-seconds",
        "20",
        "--height",
        "128",
        "--width",
        "128",
        log_path=logs / "demo-server.log",
    ) as server:
        yield server
