"""The studio's live control panel in headless Chromium: the audio-mapping logic (js/audiomap.js) on its
own, the tempo controls against the server, the OSC help, handing a timeline to the server, and an audio
input (Chromium's fake microphone) driving a live setting of a running stream over the data channel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.harness import ServerProcess
from studio.drivers import DriverBase

pytestmark = pytest.mark.browser


def open_studio(driver: DriverBase, server: ServerProcess) -> None:
    driver.goto(f"{server.url}/")
    driver.wait("document.body.dataset.ready === 'true'", 15, "the studio to start")
    driver.wait(
        "document.getElementById('model-state').textContent === 'ready'", 15, "the model to show ready"
    )


@pytest.fixture
def tempo_restored(server: ServerProcess) -> Iterator[None]:
    yield
    httpx.put(f"{server.url}/api/v1/tempo", json={"bpm": 120, "quantum": 4, "quantize": "off"}, timeout=10)


AUDIOMAP_CHECKS = """(async () => {
  const m = await import('/js/audiomap.js');
  const prompts = [{text: 'a', weight: 1}, {text: 'b', weight: 1}];
  const mappings = [
    {source: 'level', target: 'noise_scale', min: 0.2, max: 0.8, smoothing: 0},
    {source: 'bass', target: 'weight:2', min: 0, max: 2, smoothing: 0.5},
    {source: 'onset', target: 'trigger:next-prompt', min: 0, max: 1, smoothing: 0},
    {source: 'beat', target: 'trigger:reset', min: 0, max: 1, smoothing: 0},
  ];
  const state = {}, sent = {};
  const first = m.step(state, mappings, {level: 0.5, bass: 1, onset: true, beat: false}, prompts);
  const out1 = m.messages(first, prompts, sent, {transition: {steps: 3, method: 'slerp'}});
  out1.forEach(x => m.remember(sent, x));
  const second = m.step(state, mappings, {level: 0.505, bass: 0, onset: false, beat: true}, prompts);
  const out2 = m.messages(second, prompts, sent, {});
  const onsets = new m.OnsetDetector({sensitivity: 2, refractory: 0.1, floor: 0});
  const hits = [0.1, 0.1, 1.0, 1.0, 0.1, 2.0].map((f, i) => onsets.update(f, i * 0.05));
  return {first, out1, second, out2, hits, smoothNone: m.smooth(0.3, 0.9, 0), crossed:
    [m.beatCrossed(3.9, 4.1), m.beatCrossed(4.1, 4.9), m.beatCrossed(undefined, 1.2)]};
})()"""


def test_audio_mapping_logic(chromium: DriverBase, server: ServerProcess) -> None:
    d = chromium
    open_studio(d, server)
    r: dict[str, Any] = d.js(AUDIOMAP_CHECKS)
    assert r["first"]["values"] == {"noise_scale": 0.5}
    assert r["first"]["weights"] == [1, 2]  # the first reading of a level is taken as it is
    assert r["first"]["triggers"] == ["next-prompt"]
    continuous, solo = r["out1"]
    assert continuous == {
        "noise_scale": 0.5,
        "prompts": [{"text": "a", "weight": 1}, {"text": "b", "weight": 2}],
        "switch": "refresh",
        "quantize": "off",
    }
    assert solo == {
        "prompts": [{"text": "a", "weight": 1}, {"text": "b", "weight": 0}],
        "transition": {"steps": 3, "method": "slerp"},
    }
    # Smoothing 0.5 halves the way to the new bass level; a noise change under epsilon is not sent again
    assert r["second"]["weights"] == [1, 1] and r["second"]["triggers"] == ["reset"]
    assert r["out2"] == [
        {
            "prompts": [{"text": "a", "weight": 1}, {"text": "b", "weight": 1}],
            "switch": "refresh",
            "quantize": "off",
        },
        {"reset": True},
    ]
    assert r["hits"] == [True, False, True, False, False, True]
    assert r["smoothNone"] == 0.9 and r["crossed"] == [True, False, False]


def test_tempo_osc_help_and_the_server_timeline(
    chromium: DriverBase, server: ServerProcess, tempo_restored: None
) -> None:
    d = chromium
    open_studio(d, server)
    d.fill("#tempo-bpm", "96")
    d.wait("document.getElementById('control-msg').textContent.includes('96 BPM')", 10, "the tempo change")
    d.fill("#tempo-quantize", "bar")
    d.wait(
        "document.getElementById('control-msg').textContent.includes('bar')", 10, "the quantisation change"
    )
    tempo = httpx.get(f"{server.url}/api/v1/tempo", timeout=10).json()
    assert tempo["bpm"] == 96 and tempo["quantize"] == "bar"
    d.js("document.getElementById('osc-help').open = true")
    d.wait("document.getElementById('osc-info').textContent.includes('UDP')", 10, "the OSC help")
    assert f":{server.port}" in d.text("#osc-info") and "noise_scale" in d.text("#osc-info")

    d.click("#input-panel label:has(> input[value=text])")
    d.click("#start")
    d.wait("window.studio.running", 30, "the stream to start")
    d.click("#timeline-new")
    d.click("#timeline-to-server")
    d.wait(
        "document.getElementById('control-msg').textContent.startsWith('✓ The server has')", 10, "the upload"
    )
    sid = d.js("window.studio.stream.sessionId")
    status = httpx.get(f"{server.url}/api/v1/sessions/{sid}/timeline", timeout=10).json()
    assert status["segments"] == 1 and status["playing"] is False
    d.click("#start")
    d.wait("!window.studio.running", 15, "the stream to stop")


def test_the_microphone_drives_a_live_setting(chromium: DriverBase, server: ServerProcess) -> None:
    d = chromium
    open_studio(d, server)
    # One mapping whose range is a single value: whatever the fake microphone plays, the setting it
    # sends is known, and it arrives through the data channel like any other update.
    d.js(
        "window.studio.state.audioMappings.splice(0, Infinity, "
        + json.dumps({"source": "level", "target": "noise_scale", "min": 0.35, "max": 0.35, "smoothing": 0})
        + ")"
    )
    d.click("#input-panel label:has(> input[value=text])")
    d.click("#start")
    d.wait("window.studio.running", 30, "the stream to start")
    d.click("#audio-toggle")
    d.wait("document.getElementById('audio-toggle').getAttribute('aria-pressed') === 'true'", 10, "listening")
    sid = d.js("window.studio.stream.sessionId")

    def noise() -> float:
        return httpx.get(f"{server.url}/api/v1/sessions/{sid}", timeout=10).json()["settings"]["noise_scale"]

    d.wait(
        f"fetch('/api/v1/sessions/{sid}').then(r => r.json()).then(s => s.settings.noise_scale === 0.35)",
        20,
        "the audio mapping's noise scale on the server",
    )
    assert noise() == pytest.approx(0.35)
    events = httpx.get(f"{server.url}/api/v1/sessions/{sid}/events", timeout=10).json()
    assert any(e["type"] == "control" and "noise_scale" in e["applied"] for e in events)
    d.click("#audio-toggle")
    d.click("#start")
    d.wait("!window.studio.running", 15, "the stream to stop")


MIDIMAP_CHECKS = """(async () => {
  const m = await import('/js/midimap.js');
  const prompts = [{text: 'a', weight: 1}, {text: 'b', weight: 1}];
  const knob = {control: null, target: 'noise_scale', min: 0.2, max: 1};
  const pad = {control: null, target: 'prompt:2', min: 0, max: 1};
  const learned = [m.learn(knob, m.parse([0xB3, 21, 5])), m.learn(pad, m.parse([0x90, 36, 100]))];
  const maps = [knob, pad];
  const turn = m.messages(m.apply(maps, m.parse([0xB3, 21, 127]), prompts), prompts, {});
  const other = m.apply(maps, m.parse([0xB0, 21, 127]), prompts);  // channel 1: not bound
  const hit = m.messages(m.apply(maps, m.parse([0x90, 36, 90]), prompts), prompts,
    {transition: {steps: 2, method: 'linear'}});
  return {learned, knob: knob.control, turn, other, hit, off: m.parse([0x90, 36, 0]),
    label: m.describe(knob.control)};
})()"""


def test_midi_mapping_logic(chromium: DriverBase, server: ServerProcess) -> None:
    d = chromium
    open_studio(d, server)
    r: dict[str, Any] = d.js(MIDIMAP_CHECKS)
    assert r["learned"] == [True, True] and r["knob"] == {"kind": "cc", "channel": 4, "number": 21}
    assert r["turn"] == [{"noise_scale": 1, "quantize": "off"}]
    assert r["other"] == {"values": {}, "weights": None, "actions": []}
    assert r["hit"] == [
        {
            "prompts": [{"text": "a", "weight": 0}, {"text": "b", "weight": 1}],
            "transition": {"steps": 2, "method": "linear"},
        }
    ]
    assert r["off"] is None and r["label"] == "CC 21 · ch 4"


FAKE_MIDI = """(() => {
  const input = {name: 'test controller', onmidimessage: null};
  window.fakeMidi = input;
  navigator.requestMIDIAccess = async () => ({inputs: new Map([['1', input]]), onstatechange: null});
})()"""


def test_midi_learn_binds_a_knob_that_drives_a_live_setting(
    chromium: DriverBase, server: ServerProcess
) -> None:
    d = chromium
    open_studio(d, server)
    d.js(FAKE_MIDI)  # a stand-in for a controller: the page's Web MIDI access, nothing else replaced
    d.click("#midi-toggle")
    d.wait(
        "document.getElementById('midi-state').textContent.includes('test controller')", 10, "the controller"
    )
    d.click("#midi-add")
    d.click("button[aria-label='learn MIDI mapping 1']")
    d.js("window.fakeMidi.onmidimessage({data: new Uint8Array([0xB0, 7, 10])})")
    d.wait(
        "document.querySelector('#midi-mappings .hint').textContent === 'CC 7 · ch 1'", 10, "the learned knob"
    )
    d.click("#input-panel label:has(> input[value=text])")
    d.click("#start")
    d.wait("window.studio.running", 30, "the stream to start")
    sid = d.js("window.studio.stream.sessionId")
    d.js("window.fakeMidi.onmidimessage({data: new Uint8Array([0xB0, 7, 0])})")  # fader down: min 0
    d.js("window.fakeMidi.onmidimessage({data: new Uint8Array([0xB0, 7, 127])})")  # then up: max 1
    d.wait(
        f"fetch('/api/v1/sessions/{sid}').then(r => r.json()).then(s => s.settings.noise_scale === 1)",
        20,
        "the fader's last value on the server",
    )
    d.click("#start")
    d.wait("!window.studio.running", 15, "the stream to stop")
