"""The studio's live-rig parts in Chromium against `wanstream serve --demo`: the screen as an input (the
browser's display capture, Chromium's fake screen here) and the I/O panel (add an MPEG-TS output, see its
state and counts, play its address with PyAV, remove it; the machine's GPU and I/O list)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.harness import ServerProcess
from studio.drivers import DriverBase
from studio.test_studio import open_studio, session, start_stream, stop_stream

pytestmark = pytest.mark.browser


def test_screen_capture_feeds_the_stream_like_a_camera(
    chromium: DriverBase, server: ServerProcess, artifacts: Path
) -> None:
    d = chromium
    open_studio(d, server)
    d.click("#input-panel label:has(> input[value=screen])")
    assert d.js("window.studio.state.input") == "screen"
    start_stream(d, artifacts, "chromium-screen")
    d.wait(
        "document.getElementById('input-preview').srcObject !== null", 10, "the shared screen in the preview"
    )
    info = session(server, d)
    assert info["kind"] == "webrtc" and info["stats"]["frames_received"] > 0
    stop_stream(d, server)
    d.wait("document.getElementById('input-preview').srcObject === null", 10, "screen sharing to stop")


def test_io_panel_adds_shows_and_removes_an_output(
    chromium: DriverBase, server: ServerProcess, artifacts: Path
) -> None:
    d = chromium
    open_studio(d, server)
    d.click("#input-panel label:has(> input[value=text])")
    d.wait("document.querySelectorAll('#io-hardware li').length > 3", 10, "the machine's I/O list")
    listed = d.text("#io-hardware")
    assert "GPU:" in listed and "ts (out)" in listed and "spout" in listed
    start_stream(d, artifacts, "chromium-io")
    d.js(
        "(() => { const s = document.getElementById('io-kind'); s.value = 'ts'; s.dispatchEvent(new Event('change')); })()"
    )
    d.click("#io-add")
    d.wait("document.getElementById('io-msg').textContent.includes('ts added')", 20, "the output to be added")
    d.wait(
        "[...document.querySelectorAll('#io-sinks li')].some(li => li.textContent.includes('running')"
        " && /\\d+ sent · \\d+ dropped/.test(li.textContent))",
        20,
        "the output's state and counts",
    )
    url = d.text("#io-ts-url")
    sid = session(server, d)["session_id"]
    assert url.endswith(f"/api/v1/sessions/{sid}/output.ts")
    assert [s["id"] for s in session(server, d)["sinks"]] == ["ts"]
    with httpx.stream("GET", url.replace(url.split("/api/")[0], server.url), timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp2t"
        first = next(response.iter_bytes())
        assert first[0] == 0x47  # an MPEG-TS packet starts with the sync byte
    d.screenshot(artifacts / "chromium-io-panel.png", "#io-panel")
    d.click("#io-sinks button[aria-label='remove output ts']")
    d.wait("document.getElementById('io-msg').textContent.includes('ts removed')", 20, "the output removed")
    assert session(server, d)["sinks"] == []
    assert d.js("window.studio.state.ioSinks.length") == 0
    stop_stream(d, server)
