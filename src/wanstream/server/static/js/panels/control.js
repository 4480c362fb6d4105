// Live control: the server's tempo (BPM, bar, quantisation, tap tempo, Ableton Link), audio-reactive
// mappings (microphone or another audio input → live settings), the OSC address help, and handing the
// timeline to the server so OSC / REST can play, stop and seek it.

import { api } from "../api.js";
import * as audiomap from "../audiomap.js";
import * as midimap from "../midimap.js";
import { $, el, say } from "../ui.js";

const ANALYSIS_MS = 33; // about 30 analysis frames per second
const SEND_MS = 100; // at most ten audio-driven updates per second (and one in flight)

let tempo = null; // GET /api/v1/tempo, with the time it was read
let audio = null; // {context, stream, analyser, timer, ...} while listening
let osc = null;
let midi = null; // {access, learning: mapping | null, inFlight, waiting: message | null} once connected

export function init(app) {
  app.state.audioMappings ??= [audiomap.newMapping()];
  $("tempo-bpm").addEventListener("change", (e) => setTempo({ bpm: Number(e.target.value) }));
  $("tempo-quantum").addEventListener("change", (e) => setTempo({ quantum: Number(e.target.value) }));
  $("tempo-quantize").addEventListener("change", (e) => setTempo({ quantize: e.target.value }));
  $("tempo-link").addEventListener("change", (e) => setTempo({ link: e.target.checked }));
  $("tempo-tap").addEventListener("click", () => post("/api/v1/tempo/tap"));
  $("tempo-downbeat").addEventListener("click", () => post("/api/v1/tempo/downbeat"));
  $("audio-toggle").addEventListener("click", () => (audio ? stopAudio() : startAudio(app)));
  $("audio-add").addEventListener("click", () => {
    app.state.audioMappings.push(audiomap.newMapping());
    app.save();
    renderMappings(app);
  });
  app.state.midiMappings ??= [];
  $("midi-toggle").addEventListener("click", () => connectMidi(app));
  $("midi-add").addEventListener("click", () => {
    app.state.midiMappings.push(midimap.newMapping());
    app.save();
    renderMidi(app);
  });
  renderMidi(app);
  $("timeline-to-server").addEventListener("click", () => timelineToServer(app));
  $("osc-help").addEventListener("toggle", () => { if ($("osc-help").open) loadOsc(); });
  renderMappings(app);
  refreshTempo();
  setInterval(refreshTempo, 1000);
  setInterval(renderBeat, 50);
}

export function render(app) {
  $("timeline-to-server").disabled = !app.running;
}

// ---------------------------------------------------------------------------------------------------
// Tempo

async function refreshTempo() {
  try {
    const status = await api("/api/v1/tempo", { timeout: 4000 });
    tempo = { ...status, readAt: performance.now() / 1000 };
  } catch {
    return; // the server watch in main.js reports an unreachable server
  }
  const set = (id, value) => { if (document.activeElement !== $(id)) $(id).value = String(value); };
  set("tempo-bpm", tempo.bpm);
  set("tempo-quantum", tempo.quantum);
  set("tempo-quantize", tempo.quantize);
  $("tempo-link").checked = tempo.link;
  $("tempo-link-state").textContent = tempo.link
    ? `Link: ${tempo.link_peers} peer${tempo.link_peers === 1 ? "" : "s"}`
    : tempo.link_error ? `Link: ${tempo.link_error}` : "";
}

// The beat now, extrapolated from the last reading (between polls the counter keeps moving).
export function currentBeat() {
  if (!tempo) return undefined;
  return tempo.beat + ((performance.now() / 1000 - tempo.readAt) * tempo.bpm) / 60;
}

function renderBeat() {
  const beat = currentBeat();
  if (beat === undefined) return;
  const inBar = Math.floor(beat) % tempo.quantum;
  $("tempo-beat").textContent = `${inBar + 1} / ${tempo.quantum}`;
  $("tempo-beat").classList.toggle("downbeat", inBar === 0);
}

async function setTempo(change) {
  try {
    const status = await api("/api/v1/tempo", { method: "PUT", json: change });
    tempo = { ...status, readAt: performance.now() / 1000 };
    say("control-msg", `✓ tempo ${status.bpm} BPM, ${status.quantum} beats a bar, prompt changes: ${status.quantize}`, "ok");
  } catch (err) {
    say("control-msg", `✗ ${err.message}`, "bad");
  }
  refreshTempo();
}

async function post(path) {
  try {
    const status = await api(path, { method: "POST" });
    tempo = { ...status, readAt: performance.now() / 1000 };
    refreshTempo();
  } catch (err) {
    say("control-msg", `✗ ${err.message}`, "bad");
  }
}

// ---------------------------------------------------------------------------------------------------
// Audio-reactive control

async function startAudio(app) {
  let stream;
  try {
    const device = $("audio-device").value;
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { deviceId: device ? { exact: device } : undefined, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (err) {
    say("control-msg", `✗ no audio input: ${err.message}`, "bad");
    return;
  }
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 1024;
  analyser.smoothingTimeConstant = 0;
  context.createMediaStreamSource(stream).connect(analyser);
  audio = {
    context, stream, analyser,
    time: new Float32Array(analyser.fftSize),
    spectrum: new Float32Array(analyser.frequencyBinCount),
    previous: null,
    onsets: new audiomap.OnsetDetector(),
    state: {},
    sent: {},
    lastBeat: undefined,
    inFlight: false,
    lastSend: 0,
  };
  audio.timer = setInterval(() => analyse(app), ANALYSIS_MS);
  $("audio-toggle").textContent = "■ Stop listening";
  $("audio-toggle").setAttribute("aria-pressed", "true");
  await listDevices();
  say("control-msg", "Listening: the mappings below drive the stream while it runs", "info");
}

function stopAudio() {
  if (!audio) return;
  clearInterval(audio.timer);
  audio.stream.getTracks().forEach((t) => t.stop());
  audio.context.close();
  audio = null;
  $("audio-toggle").textContent = "● Listen";
  $("audio-toggle").setAttribute("aria-pressed", "false");
}

async function listDevices() {
  const devices = await navigator.mediaDevices?.enumerateDevices?.().catch(() => []) ?? [];
  const select = $("audio-device");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "default input"),
    ...devices.filter((d) => d.kind === "audioinput" && d.deviceId)
      .map((d, i) => el("option", { value: d.deviceId }, d.label || `audio input ${i + 1}`)));
  select.value = chosen;
}

function features() {
  const { analyser, time, spectrum, context } = audio;
  analyser.getFloatTimeDomainData(time);
  analyser.getFloatFrequencyData(spectrum);
  let sum = 0;
  for (const x of time) sum += x * x;
  const level = Math.min(1, Math.sqrt(sum / time.length) * 4);
  const magnitudes = spectrum.map((db) => 10 ** (db / 20));
  const binHz = context.sampleRate / analyser.fftSize;
  const bassBins = Math.max(1, Math.round(150 / binHz));
  let bass = 0;
  for (let i = 0; i < bassBins; i++) bass += magnitudes[i];
  let flux = 0;
  if (audio.previous) for (let i = 0; i < magnitudes.length; i++) flux += Math.max(0, magnitudes[i] - audio.previous[i]);
  audio.previous = magnitudes;
  const now = performance.now() / 1000;
  const beat = currentBeat();
  const crossed = audiomap.beatCrossed(audio.lastBeat, beat ?? 0);
  audio.lastBeat = beat;
  return {
    level,
    bass: Math.min(1, (bass / bassBins) * 8),
    onset: audio.onsets.update(flux / magnitudes.length, now),
    beat: crossed,
  };
}

function analyse(app) {
  const f = features();
  $("audio-level").value = f.level;
  $("audio-bass").value = f.bass;
  if (f.onset) flash("audio-onset");
  if (f.beat) flash("audio-beat");
  const prompts = app.state.prompts;
  const result = audiomap.step(audio.state, app.state.audioMappings, f, prompts);
  if (!app.running) return;
  const due = audiomap.messages(result, prompts, audio.sent, { transition: app.state.transition });
  const continuous = due.filter((m) => m.quantize === "off");
  const triggers = due.filter((m) => m.quantize !== "off");
  for (const message of triggers) send(app, message); // events are never dropped
  const now = performance.now();
  if (continuous.length && !audio.inFlight && now - audio.lastSend >= SEND_MS) {
    audio.inFlight = true;
    audio.lastSend = now;
    const message = continuous[0];
    send(app, message).finally(() => { if (audio) audio.inFlight = false; });
  }
}

async function send(app, message) {
  try {
    await app.stream.control(message);
    if (audio) audiomap.remember(audio.sent, message);
  } catch (err) {
    say("control-msg", `✗ audio mapping: ${err.message}`, "bad");
  }
}

function flash(id) {
  const node = $(id);
  node.classList.add("on");
  setTimeout(() => node.classList.remove("on"), 120);
}

function renderMappings(app) {
  const list = $("audio-mappings");
  const mappings = app.state.audioMappings;
  const changed = () => { app.save(); if (audio) audio.state = {}; };
  list.replaceChildren(...mappings.map((m, i) => {
    const n = i + 1;
    const select = (key, options, label, tip) => {
      const node = el("select", { "aria-label": `mapping ${n} ${label}`, "data-tip": tip },
        options.map((o) => el("option", { value: o }, o.replace(":", " "))));
      node.value = m[key];
      node.addEventListener("change", () => { m[key] = node.value; changed(); });
      return node;
    };
    const number = (key, label, tip, attrs) => {
      const node = el("input", { type: "number", value: m[key], "aria-label": `mapping ${n} ${label}`, "data-tip": tip, ...attrs });
      node.addEventListener("change", () => { m[key] = Number(node.value) || 0; changed(); });
      return node;
    };
    return el("div", { class: "row tight mapping" },
      select("source", audiomap.SOURCES, "source", "What drives it: level or bass loudness, onsets (hits), or the tempo's beats."),
      "→",
      select("target", audiomap.TARGETS, "target", "What it drives: the noise scale, a prompt's weight, or a trigger on each onset or beat."),
      number("min", "minimum", "The value at silence.", { step: "0.05" }),
      number("max", "maximum", "The value at full level.", { step: "0.05" }),
      number("smoothing", "smoothing", "0: follow at once; 0.95: slow and smooth.", { min: "0", max: "0.99", step: "0.05" }),
      el("button", {
        class: "small", "aria-label": `remove mapping ${n}`, "data-tip": "Remove this mapping.",
        onclick: () => { mappings.splice(i, 1); changed(); renderMappings(app); },
      }, "✕"));
  }));
}

// ---------------------------------------------------------------------------------------------------
// MIDI (the browser's Web MIDI: a controller plugged into this computer)

async function connectMidi(app) {
  if (!navigator.requestMIDIAccess) {
    say("control-msg", "✗ this browser has no Web MIDI (use Chrome, Edge or Firefox)", "bad");
    return;
  }
  let access;
  try {
    access = await navigator.requestMIDIAccess();
  } catch (err) {
    say("control-msg", `✗ MIDI: ${err.message}`, "bad");
    return;
  }
  midi = { access, learning: null, inFlight: false, waiting: null };
  const listen = () => {
    for (const input of access.inputs.values()) input.onmidimessage = (e) => onMidi(app, e.data);
    const names = [...access.inputs.values()].map((i) => i.name);
    $("midi-state").textContent = names.length ? `MIDI: ${names.join(", ")}` : "MIDI: no device connected";
  };
  access.onstatechange = listen;
  listen();
  $("midi-toggle").disabled = true;
}

function onMidi(app, data) {
  const event = midimap.parse(data);
  if (!event) return;
  if (midi.learning) {
    midimap.learn(midi.learning, event);
    midi.learning = null;
    app.save();
    renderMidi(app);
    return;
  }
  const prompts = app.state.prompts;
  const result = midimap.apply(app.state.midiMappings, event, prompts);
  if (result.actions.includes("tap")) post("/api/v1/tempo/tap");
  if (!app.running) return;
  for (const message of midimap.messages(result, prompts, { transition: app.state.transition, paused: app.paused })) {
    if (message.quantize === "off") sendLatest(app, message);
    else send(app, message);
  }
}

// A knob sends a stream of values: only the latest one waits while an update is in flight.
function sendLatest(app, message) {
  if (midi.inFlight) {
    midi.waiting = message;
    return;
  }
  midi.inFlight = true;
  send(app, message).finally(() => {
    midi.inFlight = false;
    const next = midi.waiting;
    midi.waiting = null;
    if (next) sendLatest(app, next);
  });
}

function renderMidi(app) {
  const mappings = app.state.midiMappings;
  $("midi-mappings").replaceChildren(...mappings.map((m, i) => {
    const n = i + 1;
    const target = el("select", { "aria-label": `MIDI mapping ${n} target`, "data-tip": "What the knob, fader or pad drives: a setting or prompt weight (0–127 → min–max), a prompt alone, reset, pause, or tap tempo." },
      midimap.TARGETS.map((t) => el("option", { value: t }, t.replace(":", " "))));
    target.value = m.target;
    target.addEventListener("change", () => { m.target = target.value; app.save(); });
    const number = (key, label) => {
      const node = el("input", { type: "number", step: "0.05", value: m[key], "aria-label": `MIDI mapping ${n} ${label}`, "data-tip": `The value at ${key === "min" ? "0" : "127"}.` });
      node.addEventListener("change", () => { m[key] = Number(node.value) || 0; app.save(); });
      return node;
    };
    const learning = midi?.learning === m;
    return el("div", { class: "row tight mapping" },
      el("button", {
        class: "small", "aria-pressed": String(learning), "aria-label": `learn MIDI mapping ${n}`,
        "data-tip": "Press, then move a knob or hit a pad on the controller to bind it.",
        onclick: () => {
          if (!midi) { say("control-msg", "✗ connect MIDI first", "bad"); return; }
          midi.learning = learning ? null : m;
          renderMidi(app);
        },
      }, learning ? "Move a control…" : "Learn"),
      el("span", { class: "hint" }, midimap.describe(m.control)),
      "→", target, number("min", "minimum"), number("max", "maximum"),
      el("button", {
        class: "small", "aria-label": `remove MIDI mapping ${n}`, "data-tip": "Remove this mapping.",
        onclick: () => { mappings.splice(i, 1); app.save(); renderMidi(app); },
      }, "✕"));
  }));
}

// ---------------------------------------------------------------------------------------------------
// OSC help and the server's timeline player

async function loadOsc() {
  try {
    osc = await api("/api/v1/osc", { timeout: 4000 });
  } catch (err) {
    $("osc-info").textContent = `✗ ${err.message}`;
    return;
  }
  const where = osc.enabled
    ? `OSC listens on UDP ${osc.host}:${osc.port} (senders: ${osc.auth}).`
    : `OSC is off${osc.error ? `: ${osc.error}` : " (serve --no-osc)"}.`;
  const rows = [
    ["/wanstream/prompt <text> [<weight>] …", "new prompts, blended by weight"],
    ["/wanstream/transition <steps> <method> <text> …", "blend into new prompts over steps chunks"],
    ["/wanstream/<setting> <value>", `any live setting: ${osc.settings.join(", ")}`],
    ["/wanstream/pause · /resume · /reset", "pause, resume, hard cut"],
    ["/wanstream/prompt/bar <text>", "…/beat, …/bar, …/now: land on the next beat or downbeat, or at once"],
    ["/wanstream/tempo/bpm <bpm> · /tempo/tap · /tempo/downbeat", "the tempo (also quantum, quantize, link)"],
    ["/wanstream/timeline/play · /stop · /seek <s>", "the timeline sent to the server"],
    ["/wanstream/session/<id>/…", "one session (default: the newest)"],
    ["/wanstream/control <json>", "any update as JSON, as on the WebSocket"],
  ];
  $("osc-info").replaceChildren(
    el("p", {}, where, " Replies go back to the sender: /wanstream/ack or /wanstream/error. /scope/… works too."),
    el("table", { class: "osc-table" }, rows.map(([a, what]) => el("tr", {}, el("td", {}, el("code", {}, a)), el("td", {}, what)))),
  );
}

async function timelineToServer(app) {
  const tl = app.state.timeline;
  const id = app.stream?.sessionId;
  if (!tl?.segments?.length || !id) {
    say("control-msg", "✗ start the stream and make or import a timeline first", "bad");
    return;
  }
  try {
    await api(`/api/v1/sessions/${id}/timeline`, { method: "PUT", json: { segments: tl.segments, settings: tl.settings || {}, source: tl.name } });
    say("control-msg", "✓ The server has the timeline: play, stop and seek it over OSC (/wanstream/timeline/play) or REST", "ok");
  } catch (err) {
    say("control-msg", `✗ ${err.message}`, "bad");
  }
}
