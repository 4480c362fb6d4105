"""Fixtures for the studio's browser tests: one `wanstream serve --demo` on a free loopback port, a fresh
browser profile per test (Chromium through Playwright, Firefox through WebDriver BiDi), and a folder for
the screenshots and downloads (`outputs/studio-artifacts/`, kept after the run to look at).

Without a browser the tests skip and say how to get one (`tools/ensure_browser.sh`, which `make test` runs).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.harness import ServerProcess
from studio.drivers import (
    CHROMIUM_CANDIDATES,
    FIREFOX_CANDIDATES,
    BidiDriver,
    PlaywrightDriver,
    find_executable,
    fresh_profile,
    remove_profile,
)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "outputs" / "studio-artifacts"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def studio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("studio-logs")
    # Two slots: a stream a test just stopped may still be closing when the next one starts.
    server = ServerProcess("--demo", "--max-sessions", "2", log_path=logs / "studio-server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"the server did not shut down cleanly ({code}):\n{server.log()}"


@pytest.fixture
def server(studio_server: ServerProcess) -> Iterator[ServerProcess]:
    """The shared server, with no stream left running before or after a test."""
    _wait_idle(studio_server)
    yield studio_server
    _wait_idle(studio_server)


def _wait_idle(server: ServerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=10) as c:
        while sessions := c.get("/api/v1/sessions").json():
            if time.monotonic() > deadline:
                raise AssertionError(f"streams left running: {sessions}")
            time.sleep(0.1)


def _playwright_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    return None


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[PlaywrightDriver]:
    executable = find_executable("WANSTREAM_CHROMIUM", CHROMIUM_CANDIDATES)
    if executable is None:
        pytest.skip(
            "no Chromium found (looked for $WANSTREAM_CHROMIUM, " + ", ".join(CHROMIUM_CANDIDATES) + "): "
            "run `tools/ensure_browser.sh` (apt-get install chromium) to run the studio's browser tests"
        )
    problem = _playwright_missing()
    if problem:
        pytest.skip(problem)
    profile = fresh_profile(tmp_path, "chromium")
    driver = PlaywrightDriver(executable, profile)
    try:
        yield driver
    finally:
        driver.close()
        remove_profile(profile)


@pytest.fixture
def firefox(tmp_path: Path) -> Iterator[BidiDriver]:
    executable = find_executable("WANSTREAM_FIREFOX", FIREFOX_CANDIDATES)
    if executable is None:
        pytest.skip(
            "no Firefox found (looked for $WANSTREAM_FIREFOX, " + ", ".join(FIREFOX_CANDIDATES) + "): "
            "run `tools/ensure_browser.sh` (apt-get install firefox-esr) to run the Firefox flow"
        )
    profile = fresh_profile(tmp_path, "firefox")
    driver = BidiDriver(executable, profile)
    try:
        yield driver
    finally:
        driver.close()
        remove_profile(profile)
