"""The studio in a real browser against `wanstream serve --demo`: stream from the fake camera, see frames,
change prompts, import and play a timeline, record and download, record prompts live into a timeline and
export it, and keep the user's work across a reload and a server restart.

Screenshots and downloads land in outputs/studio-artifacts/ (look at them: the tests check the pixels are not
blank, a person checks they look right).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from server.harness import ServerProcess
from studio.drivers import DriverBase
from wanstream.timeline import load_timeline

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
FELINE = ROOT / "examples" / "timeline-feline.json"
PREY = ROOT / "examples" / "timeline-prey.json"


# ----------------------------------------------------------------------------------------------------
# Helpers


def image(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def assert_not_blank(path: Path, what: str) -> None:
    pixels = image(path).astype(np.float32)
    spread = float(pixels.std())
    colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert spread > 8 and colours > 50, f"{what} looks blank ({path}: std {spread:.1f}, {colours} colours)"


def fps_shown(driver: DriverBase) -> float:
    match = re.match(r"([\d.]+) fps", driver.text("#fps"))
    return float(match.group(1)) if match else 0.0


def session(server: ServerProcess, driver: DriverBase) -> dict[str, Any]:
    sid = driver.js("window.studio.stream && window.studio.stream.sessionId")
    assert sid, f"{driver.name}: no stream session"
    return httpx.get(f"{server.url}/api/v1/sessions/{sid}", timeout=10).json()


def server_prompts(server: ServerProcess, driver: DriverBase) -> list[str]:
    return [text for text, _ in session(server, driver)["prompts"]]


def open_studio(driver: DriverBase, server: ServerProcess) -> None:
    driver.goto(f"{server.url}/")
    driver.wait("document.body.dataset.ready === 'true'", 15, "the studio to start")
    driver.wait(
        "document.getElementById('model-state').textContent === 'ready'", 15, "the model to show ready"
    )


def start_stream(driver: DriverBase, artifacts: Path, tag: str) -> None:
    driver.click("#start")
    driver.wait("document.getElementById('output').videoWidth > 0", 30, "the first generated frame")
    driver.wait(
        "parseFloat(document.getElementById('fps').textContent) > 0", 15, "the FPS overlay to read > 0"
    )
    driver.screenshot(artifacts / f"{tag}-output.png", "#stage")
    assert_not_blank(artifacts / f"{tag}-output.png", f"{driver.name}: the output video")


def stop_stream(driver: DriverBase, server: ServerProcess) -> None:
    driver.click("#start")  # ■ Stop
    driver.wait("!window.studio.running", 15, "the stream to stop")


def apply_prompt(driver: DriverBase, text: str, where: str = "#prompt-msg") -> str:
    driver.fill("#prompt-list textarea", text)
    driver.click("#apply-prompts")
    return driver.wait(
        f"(t => t.startsWith('✓ Applied') && t)(document.querySelector('{where}').textContent)",
        20,
        f"the server to acknowledge the prompt {text!r}",
    )


def segment_x(driver: DriverBase, seconds: float) -> float:
    """Where `seconds` is on the timeline axis (pixels from its left edge)."""
    return driver.js(
        f"(() => {{ const w = document.getElementById('timeline-axis').clientWidth;"
        f" const segs = window.studio.state.timeline.segments; const end = segs.at(-1).end;"
        f" return {seconds} * w / Math.max(10, end * 1.02); }})()"
    )


def untooltipped(driver: DriverBase) -> list[str]:
    return driver.js(
        "[...document.querySelectorAll('header button, main input, main select, main button, main textarea,"
        " #timeline-panel input, #timeline-panel select, #timeline-panel button, #timeline-panel textarea')]"
        ".filter(n => !n.closest('[data-tip]') && !n.closest('[hidden]'))"
        ".map(n => n.id || n.outerHTML.slice(0, 80))"
    )


def mp4_frames(data: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(data)) as container:
        frames = [f for f in container.decode(video=0)]
    assert frames, "the MP4 has no decodable frame"
    return len(frames), frames[0].width, frames[0].height


# ----------------------------------------------------------------------------------------------------
# The acceptance flow, shared by both browsers


def core_flow(driver: DriverBase, server: ServerProcess, artifacts: Path) -> None:
    name = driver.name
    open_studio(driver, server)
    driver.screenshot(artifacts / f"{name}-1-opened.png")
    assert untooltipped(driver) == [], "controls without a tooltip"

    # Stream from the fake camera: frames arrive, the overlay counts them.
    start_stream(driver, artifacts, f"{name}-2")
    driver.wait(
        "/latency [\\d.]+ s/.test(document.getElementById('latency').textContent)", 10, "a latency figure"
    )
    assert fps_shown(driver) > 0

    # A prompt change is acknowledged, and the server has it.
    ack = apply_prompt(driver, "a neon city at night, rain, reflections, cinematic")
    assert re.search(r"chunk \d+", ack), ack
    assert server_prompts(server, driver) == ["a neon city at night, rain, reflections, cinematic"]

    # Import an example timeline (its settings not applied: 480×832 would slow the CPU demo down).
    if driver.js("document.getElementById('timeline-apply-settings').checked"):
        driver.click("#timeline-apply-settings")
    driver.set_file("#timeline-file", FELINE)
    driver.wait(
        "document.getElementById('timeline-msg').textContent.startsWith('✓ Imported')", 15, "the import"
    )
    scope = json.loads(FELINE.read_text())
    assert driver.js("document.querySelectorAll('#timeline-track .segment').length") == len(scope["prompts"])
    # Scope's rule: importing while streaming puts the first segment live.
    assert server_prompts(server, driver) == [scope["prompts"][0]["prompts"][0]["text"]]

    # Play it from just before the second segment: the playhead enters it and its prompts are applied.
    boundary = scope["prompts"][1]["startTime"]
    driver.click_at("#timeline-axis", segment_x(driver, boundary - 0.6), 50)
    driver.click("#timeline-play")
    second = scope["prompts"][1]
    # Checked together, while segment 2 is the one in force: the timeline plays on and a loaded machine
    # may be slow enough for segment 3 to start before a later look.
    driver.wait(
        "document.getElementById('timeline-msg').textContent.includes('segment 2 of 5 applied') && "
        f"window.studio.state.prompts[0].text === {json.dumps(second['prompts'][0]['text'])}",
        15,
        "segment 2, applied and shown in the prompts",
    )
    driver.screenshot(artifacts / f"{name}-3-timeline-playing.png")
    events = httpx.get(
        f"{server.url}/api/v1/sessions/{session(server, driver)['session_id']}/events", timeout=10
    ).json()
    controls = [e for e in events if e["type"] == "control" and "transition" in e["applied"]]
    assert controls, "the second segment's transition never reached the server"
    driver.click("#timeline-play")  # pause

    # Record 2 s (and 10 frames: a loaded machine makes fewer a second) and download an MP4 that decodes.
    driver.click("#record")
    # At least 2 s on the recording clock (a wait for the text '0:02' could miss that one-second window
    # when the page or the polls are slow).
    driver.wait(
        "(m => m !== null && 60 * Number(m[1]) + Number(m[2]) >= 2)"
        "(/(\\d+):([\\d.]+)/.exec(document.getElementById('record-time').textContent))",
        10,
        "2 s of recording",
    )
    driver.wait(
        f"fetch('/api/v1/sessions/{session(server, driver)['session_id']}/recording')"
        ".then(r => r.json()).then(r => r.output_frames >= 10)",
        30,
        "10 frames in the recording",
    )
    driver.click("#record")
    driver.wait("!!document.getElementById('download-output')", 20, "the download link")
    filename, data = driver.download("#download-output")
    (artifacts / f"{name}-recording.mp4").write_bytes(data)
    frames, width, height = mp4_frames(data)
    stream_size = session(server, driver)["settings"]
    assert (width, height) == (stream_size["width"], stream_size["height"])
    assert frames >= 10, f"{frames} frames in the recording (the server had written 10 or more)"
    assert filename.endswith(".mp4")

    stop_stream(driver, server)
    driver.screenshot(artifacts / f"{name}-4-stopped.png")
    assert driver.errors == [], f"errors in the page: {driver.errors}"


def test_chromium_stream_prompts_timeline_recording(
    chromium: DriverBase, server: ServerProcess, artifacts: Path
) -> None:
    core_flow(chromium, server, artifacts)


def test_firefox_stream_prompts_timeline_recording(
    firefox: DriverBase, server: ServerProcess, artifacts: Path
) -> None:
    core_flow(firefox, server, artifacts)


# ----------------------------------------------------------------------------------------------------
# Chromium only: the other inputs, live timeline recording, persistence, errors, shortcuts


def test_live_prompts_become_a_timeline_that_generate_replays(
    chromium: DriverBase, server: ServerProcess, artifacts: Path, tmp_path: Path
) -> None:
    d = chromium
    open_studio(d, server)
    d.click("#input-panel label:has(> input[value=text])")
    start_stream(d, artifacts, "chromium-text")

    d.click("#timeline-live")
    apply_prompt(d, "a red fox in the snow, soft light")
    d.js("new Promise(r => setTimeout(r, 700))")
    d.fill("#transition-steps", "2")
    d.fill("#transition-method", "slerp")
    d.fill("#prompt-list textarea", "a white owl in the snow, soft light")
    d.press("Control+Enter")  # the shortcut, typed in the prompt
    d.wait(
        "document.getElementById('prompt-msg').textContent.includes('blending over 2 chunks')", 20, "the ack"
    )
    d.js("new Promise(r => setTimeout(r, 700))")
    d.click("#timeline-live")
    d.wait(
        "document.getElementById('timeline-msg').textContent.startsWith('Recorded 3 segments')",
        5,
        "the recording",
    )
    d.screenshot(artifacts / "chromium-live-timeline.png")

    # Space pauses and resumes (with the focus on the page, not in a field).
    d.click("#stage")
    d.press("Space")
    d.wait("document.getElementById('pause').textContent.includes('Resume')", 10, "the pause")
    assert session(server, d)["stats"]["paused"] is True
    d.press("Space")
    d.wait("document.getElementById('pause').textContent.includes('Pause')", 10, "the resume")
    assert session(server, d)["stats"]["paused"] is False
    stop_stream(d, server)

    filename, data = d.download("#timeline-export")
    exported = tmp_path / filename
    exported.write_bytes(data)
    (artifacts / "chromium-live-timeline.json").write_bytes(data)
    timeline = load_timeline(exported)
    texts = [s.prompts[0].text for s in timeline.segments]
    assert texts == [
        "a cinematic oil painting, vivid colours, soft light, highly detailed",
        "a red fox in the snow, soft light",
        "a white owl in the snow, soft light",
    ]
    assert timeline.segments[1].start >= 0 and timeline.segments[2].start - timeline.segments[1].start >= 0.6
    assert (timeline.segments[2].transition_steps, timeline.segments[2].interpolation) == (2, "slerp")
    assert timeline.settings.input_mode == "text" and timeline.settings.seed == 42

    # The performance replays offline: `wanstream generate` takes the exported file as it is.
    out = tmp_path / "replay.mp4"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "wanstream.cli.main",
            "generate",
            "--demo",
            "--timeline",
            str(exported),
            "--fps",
            "4",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    assert "3 timeline segments" in run.stdout + run.stderr
    frames, _, _ = mp4_frames(out.read_bytes())
    assert frames > 0


def test_video_file_input(
    chromium: DriverBase, server: ServerProcess, artifacts: Path, tmp_path: Path
) -> None:
    clip = tmp_path / "clip.webm"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libvpx", rate=15)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        y, x = np.mgrid[0:240, 0:320]
        for i in range(45):
            rgb = np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, (x + y) % 256], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    d = chromium
    open_studio(d, server)
    d.click("#input-panel label:has(> input[value=file])")
    d.set_file("#video-file", clip)
    d.wait("document.getElementById('input-msg').textContent.includes('clip.webm ready')", 5, "the file")
    start_stream(d, artifacts, "chromium-file")
    assert session(server, d)["stats"]["frames_received"] > 0
    d.screenshot(artifacts / "chromium-file-input.png")
    stop_stream(d, server)


def test_vace_and_lora_controls(chromium: DriverBase, server: ServerProcess, artifacts: Path) -> None:
    d = chromium
    open_studio(d, server)
    d.wait(
        "!!document.querySelector('[aria-label=\"VACE on\"]')", 10, "the VACE controls (the demo has VACE)"
    )
    d.click('[aria-label="VACE on"]')
    d.fill("#height", "128")  # VACE doubles the demo's work on a CPU: a smaller stream keeps the test short
    d.fill("#width", "128")
    d.click("#start")
    d.wait("window.studio.running", 30, "the VACE stream to start")
    vace = session(server, d)["vace"]
    assert vace is not None and vace["input_as_control"], vace  # the camera steers, as Scope

    d.fill('[aria-label="VACE scale"]', "0.5")
    d.wait(
        "document.getElementById('settings-msg').textContent === '✓ VACE scale applied'", 10, "the scale ack"
    )
    d.wait(
        f"fetch('/api/v1/sessions/{session(server, d)['session_id']}').then(r => r.json()).then(s => s.vace.context_scale === 0.5)",
        10,
        "the server's VACE scale",
    )

    # A LoRA the server does not have: its refusal shows where the user typed the name.
    d.click("text=+ LoRA")
    d.fill('[aria-label="LoRA file"]', "no-such-style.safetensors")
    d.wait("document.getElementById('settings-msg').textContent.startsWith('✗')", 10, "the LoRA refusal")
    assert "lora" in d.text("#settings-msg").lower()
    assert d.js("document.querySelector('[aria-label=\"LoRA file\"]').value") == "no-such-style.safetensors"
    assert session(server, d)["settings"]["loras"] == []  # nothing changed
    d.screenshot(artifacts / "chromium-vace-lora.png")
    stop_stream(d, server)
    assert d.errors == [], f"errors in the page: {d.errors}"


def test_missing_weights_show_the_download_command_and_the_demo_loads(
    chromium: DriverBase, artifacts: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    server = ServerProcess("--models-dir", str(empty), log_path=tmp_path / "server.log")
    d = chromium
    try:
        server.wait_ready(model=False)
        d.goto(f"{server.url}/")
        d.wait("document.getElementById('model-state').textContent === 'failed'", 30, "the failed load")
        command = d.text("#download-command")
        assert command.startswith("wanstream download") and str(empty) in command
        assert d.js("!document.getElementById('model-download').hidden")
        # The schema's defaults meanwhile (the page's built-in ones show until the schema has arrived).
        d.wait("document.getElementById('height').value === '480'", 10, "the schema's defaults")
        d.click("#start")
        d.wait(
            "document.getElementById('stage-note').textContent.includes('No model is loaded')", 5, "the hint"
        )
        d.screenshot(artifacts / "chromium-missing-weights.png")
        d.click("#load-demo")
        d.wait("document.getElementById('model-state').textContent === 'ready'", 60, "the demo model")
        d.wait("document.getElementById('height').value === '256'", 10, "the demo's defaults")
        assert d.js("document.getElementById('model-download').hidden")
        assert d.errors == [], f"errors in the page: {d.errors}"
    finally:
        d.goto("about:blank")
        assert server.stop() == 0, server.log()


def test_work_survives_reload_and_a_restart_asks_first(
    chromium: DriverBase, server: ServerProcess, artifacts: Path
) -> None:
    d = chromium
    open_studio(d, server)
    mine = "a watercolour harbour at dawn, fishing boats"
    d.fill("#prompt-list textarea", mine)
    d.fill("#seed", "1234")
    d.wait(
        "document.getElementById('settings-msg').textContent.startsWith('Saved')", 5, "the seed to be saved"
    )

    # Errors show where the user acted: a step list out of order, a timeline the server rejects.
    d.fill("#steps-list input:last-child", "900")
    d.wait(
        "document.getElementById('settings-msg').textContent.includes('steps must go down')",
        5,
        "the steps error",
    )
    bad = artifacts / "overlapping-timeline.json"
    bad.write_text(
        json.dumps(
            {
                "prompts": [
                    {"startTime": 0, "endTime": 3, "prompts": [{"text": "a", "weight": 1}]},
                    {"startTime": 2, "endTime": 4, "prompts": [{"text": "b", "weight": 1}]},
                ]
            }
        )
    )
    d.set_file("#timeline-file", bad)
    d.wait(
        "document.getElementById('timeline-msg').textContent.includes('prompts[1].startTime')",
        10,
        "the import error",
    )

    # A timeline with its settings applied (not streaming: they are saved for the next start).
    assert d.js("document.getElementById('timeline-apply-settings').checked")
    d.set_file("#timeline-file", PREY)
    d.wait("document.getElementById('timeline-msg').textContent.startsWith('✓ Imported')", 10, "the import")
    assert d.js("[document.getElementById('height').value, document.getElementById('width').value]") == [
        "480",
        "832",
    ]
    assert d.js("document.getElementById('noise-controller').checked") is False
    d.screenshot(artifacts / "chromium-settings-after-import.png")

    d.reload()
    d.wait("document.body.dataset.ready === 'true'", 15, "the studio after a reload")
    assert d.js("document.querySelector('#prompt-list textarea').value") == mine
    assert d.js("document.getElementById('seed').value") == "42"  # the timeline's seed replaced 1234
    assert d.text("#timeline-name") == PREY.name

    # What a restarted server looks like to the page: another instance id than the one its work was
    # saved with. While the page is open, the next health check notices and asks before discarding.
    d.js("window.studio.state.instance = 'before-restart'")
    d.wait("document.getElementById('dialog').open", 10, "the restart question")
    assert d.text("#dialog-title") == "The server restarted"
    d.screenshot(artifacts / "chromium-restart-question.png")
    d.click("#keep-work")
    d.wait("!document.getElementById('dialog').open", 5, "the dialog to close")
    assert d.js("document.querySelector('#prompt-list textarea').value") == mine
    d.wait(
        f"window.studio.state.instance === {json.dumps(httpx.get(f'{server.url}/health').json()['instance'])}",
        5,
        "the new instance to be remembered",
    )

    # After a reload (the page was closed while the server restarted) it asks too; this time: discard.
    d.js("(window.studio.state.instance = 'before-restart', window.studio.save(true))")
    d.reload()
    d.wait("document.getElementById('dialog').open", 10, "the restart question after a reload")
    d.click("#discard-work")
    d.wait(  # the discarded prompt gone from the state, and the list rendered from the new state
        f"window.studio.state.prompts[0].text !== {json.dumps(mine)} && "
        "document.querySelector('#prompt-list textarea').value === window.studio.state.prompts[0].text",
        5,
        "the discard and its render",
    )
    assert d.js("document.querySelector('#prompt-list textarea').value") != mine
    assert d.js("window.studio.state.timeline") is None
    d.wait("document.getElementById('height').value === '256'", 5, "the server's default size again")
    assert mine in d.js("localStorage.getItem('wanstream.studio.discarded')")  # set aside, not lost

    # Keyboard: ? shows the shortcuts.
    d.click("#stage")
    d.press("?")
    d.wait(
        "document.getElementById('dialog').open && document.getElementById('dialog-title').textContent === 'Keyboard shortcuts'",
        5,
        "the help",
    )
    d.press("Escape")
    assert d.errors == [], f"errors in the page: {d.errors}"
