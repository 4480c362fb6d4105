"""Fixtures: one `wanstream serve --demo` subprocess on loopback for the whole test session."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.harness import ServerProcess
from wanstream.media.sample import write_sample_clip


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    write_sample_clip(folder / "sample.mp4", num_frames=48, height=240, width=320)
    return folder


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("logs")
    server = ServerProcess(
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
    )
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"the server did not shut down cleanly ({code}):\n{server.log()}"


@pytest.fixture
def server(demo_server: ServerProcess) -> Iterator[ServerProcess]:
    """The shared demo server, checked idle before and after each test (tests leave no session behind)."""
    with demo_server.client() as c:
        _wait_idle(c)
    yield demo_server
    with demo_server.client() as c:
        _wait_idle(c)


def _wait_idle(c: httpx.Client, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while c.get("/api/v1/sessions").json():
        assert time.monotonic() < deadline, f"sessions left running: {c.get('/api/v1/sessions').json()}"
        time.sleep(0.1)
