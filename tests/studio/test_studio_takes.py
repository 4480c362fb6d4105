"""Takes in the studio (Chromium against `wanstream serve --demo`): record 2 s of the fake camera, stop,
*Save take* downloads the session log (a zip with log.json, the recording's take), and *Replay take*
replays it on the server: the verdict says every frame is identical bit for bit, and the recording, the
replay and their difference are shown side by side, the difference black (0) at the frames looked at, and
axe-core finds nothing critical or serious in the section."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from server.harness import ServerProcess
from studio.drivers import PlaywrightDriver
from studio.test_accessibility import axe_source
from studio.test_studio import open_studio, session, start_stream, stop_stream

pytestmark = pytest.mark.browser

LARGEST = "document.getElementById('replay-diff-note').dataset.largest"


def test_save_take_and_replay_it_side_by_side(
    chromium: PlaywrightDriver, server: ServerProcess, artifacts: Path
) -> None:
    d = chromium
    open_studio(d, server)
    assert d.js("document.getElementById('take-replay').disabled")  # no stream yet: no take
    start_stream(d, artifacts, "chromium-take")
    sid = session(server, d)["session_id"]

    d.click("#record")
    d.wait(
        "(m => m !== null && 60 * Number(m[1]) + Number(m[2]) >= 2)"
        "(/(\\d+):([\\d.]+)/.exec(document.getElementById('record-time').textContent))",
        10,
        "2 s of recording",
    )
    d.wait(
        f"fetch('/api/v1/sessions/{sid}/recording').then(r => r.json()).then(r => r.output_frames >= 10)",
        30,
        "10 frames in the recording",
    )
    d.click("#record")
    d.wait("!!document.getElementById('download-output')", 20, "the recording to stop")
    stop_stream(d, server)  # the take outlives its stream

    name, data = d.download("#take-save")
    (artifacts / "chromium-take.wslog").write_bytes(data)
    assert name == f"wanstream-{sid}.wslog"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        header = json.loads(z.read("log.json"))
    assert header["format"] == "wanstream-session-log" and header["ops"]
    assert header["take"]["first_output"] > 0  # the recording's take: it starts after the stream did

    d.click("#take-replay")
    verdict = d.wait(
        "(t => t.includes('frames identical bit for bit') && t)"
        "(document.getElementById('replay-verdict').textContent)",
        120,
        "the replay's verdict",
    )
    assert verdict.startswith("✓"), verdict
    d.wait(f"{LARGEST} === '0'", 30, "the difference of the first frames")
    views = d.js(
        "['replay-live', 'replay-video', 'replay-diff'].map(id => (r => r.width > 40 && r.height > 40)"
        "(document.getElementById(id).getBoundingClientRect()))"
    )
    assert views == [True, True, True], views
    colours = d.js(  # a difference of 0 between two real pictures, not two blank ones
        "(v => { const c = Object.assign(document.createElement('canvas'), {width: v.videoWidth, height: v.videoHeight});"
        " const x = c.getContext('2d'); x.drawImage(v, 0, 0); const p = x.getImageData(0, 0, c.width, c.height).data;"
        " const seen = new Set(); for (let i = 0; i < p.length; i += 28) seen.add(p[i] << 16 | p[i + 1] << 8 | p[i + 2]);"
        " return seen.size; })(document.getElementById('replay-live'))"
    )
    assert colours > 50, f"the recording's frame looks blank ({colours} colours)"

    # Later frames: a step, then playing together and stopping anywhere: still the same frames.
    d.js(f"{LARGEST} = ''")
    d.click("#replay-forward")
    d.wait(f"{LARGEST} === '0'", 15, "the difference one frame on")
    d.click("#replay-play")
    d.js("new Promise(r => setTimeout(r, 600))")
    d.js(f"{LARGEST} = ''")
    d.click("#replay-play")  # pause: both videos settle on one moment
    d.wait(f"{LARGEST} === '0'", 15, "the difference where playing stopped")
    assert d.js("document.getElementById('replay-live').currentTime") > 0
    d.screenshot(artifacts / "chromium-take-replay.png", "#record-panel")

    d.page.evaluate(axe_source())
    violations = d.page.evaluate(
        "async () => (await axe.run('#record-panel', {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))}))"
    )
    assert [v for v in violations if v["impact"] in ("critical", "serious")] == [], violations
    assert d.errors == [], f"errors in the page: {d.errors}"
