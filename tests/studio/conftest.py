"""Fixtures for the studio's browser tests: one `wanstream serve --demo` on a free loopback port, a fresh
browser profile per test (Chromium through Playwright, Firefox through WebDriver BiDi), and a folder for
the screenshots and downloads (`outputs/studio-artifacts/`, kept after the run to look at).

Without a browser the tests skip and say how to get one (`tools/ensure_browser.sh`, which `make test` runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.harness import ServerProcess, serving
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
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The studio's demo server: the demo's own defaults, which the page shows (`server` in tests/conftest.py
    waits for it to be idle). Two slots: a stream a test just stopped may still be closing when the next
    one starts."""
    logs = tmp_path_factory.mktemp("studio-logs")
    with serving("--demo", "--max-sessions", "2", log_path=logs / "studio-server.log") as server:
        yield server


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
