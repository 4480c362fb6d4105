// The studio: one page that runs a stream and keeps the user's work. Panels live in ./panels/; this file
// holds the shared state, the stream's lifetime, the watch on the server, and keyboard shortcuts.

import { api, ApiError } from "./api.js";
import { FrameCounter, Stream } from "./stream.js";
import * as store from "./store.js";
import { LiveRecorder } from "./timeline.js";
import { $, ask, el, installTooltips, isTyping, say } from "./ui.js";
import * as controlPanel from "./panels/control.js";
import { vaceOffer } from "./panels/extensions.js";
import * as inputPanel from "./panels/input.js";
import * as ioPanel from "./panels/io.js";
import * as modelPanel from "./panels/model.js";
import * as promptPanel from "./panels/prompts.js";
import * as recordPanel from "./panels/recording.js";
import * as settingsPanel from "./panels/settings.js";
import * as takesPanel from "./panels/takes.js";
import * as timelinePanel from "./panels/timeline.js";

const VIDEO_STEPS = [700, 500];
const TEXT_STEPS = [1000, 750];
const FALLBACK_DEFAULTS = {
  height: 256, width: 256, seed: 42, steps: null, noise_scale: 0.8, noise_controller: true,
  encoder: "wan", decoder: "wan", batching: "stream", prompt_switch: "refresh",
};
export const MANAGED = Object.keys(FALLBACK_DEFAULTS);

const loaded = store.load();

export const app = {
  state: loaded.state,
  defaults: null, // the server's default settings (once a model is loaded)
  model: null, // GET /api/v1/model
  health: null,
  stream: null,
  running: false,
  paused: false,
  recorder: new LiveRecorder(),
  counter: null,
  panels: [inputPanel, promptPanel, settingsPanel, modelPanel, recordPanel, takesPanel, timelinePanel, controlPanel, ioPanel],

  save(now = false) {
    store.save(this.state, { now });
  },

  mode() {
    return this.state.input === "text" ? "text" : "video";
  },

  // What the stream runs with: the server's defaults under the user's changes.
  effective() {
    const s = { ...FALLBACK_DEFAULTS, ...(this.defaults || {}), ...this.state.settings, mode: this.mode() };
    if (!s.steps) s.steps = s.mode === "text" ? TEXT_STEPS : VIDEO_STEPS;
    return s;
  },

  // The settings written with a timeline (Scope's names through wanstream.timeline's fields).
  timelineSettings() {
    const s = this.effective();
    return {
      pipeline_id: "streamdiffusionv2",
      input_mode: s.mode,
      height: s.height,
      width: s.width,
      seed: s.seed,
      denoising_steps: [...s.steps],
      noise_scale: s.noise_scale,
      noise_controller: s.noise_controller,
      manage_cache: s.prompt_switch === "cut",
    };
  },

  // A settings change: saved at once, sent live when streaming; a rejected change is undone and the
  // server's reason shown in `where`. Returns the ack, "saved" (no stream), or null (rejected).
  async changeSettings(patch, where = "settings-msg") {
    const before = { ...this.state.settings };
    Object.assign(this.state.settings, patch);
    this.save();
    this.renderAll();
    if (!this.running) {
      say(where, "Saved: applies when the stream starts", "info");
      return "saved";
    }
    try {
      const ack = await this.stream.control(patch);
      const what = Object.keys(patch).join(", ");
      say(where, `✓ ${what} applied${ack.restarted ? " (the stream restarted)" : ""}`, "ok");
      return ack;
    } catch (err) {
      this.state.settings = before;
      this.save();
      this.renderAll();
      say(where, `✗ ${err.message}`, "bad");
      return null;
    }
  },

  // Prompts in force: saved, sent live, acknowledged in `where`, and captured by the live recorder.
  async applyPrompts(prompts, transition, where = "prompt-msg") {
    const clean = prompts.map((p) => ({ text: p.text, weight: Number(p.weight) }));
    if (clean.some((p) => !p.text.trim())) {
      say(where, "✗ a prompt is empty: write something or remove it", "bad");
      return null;
    }
    this.state.prompts = clean;
    this.save();
    promptPanel.render(this);
    if (!this.running) {
      say(where, "Saved: these prompts start the stream", "info");
      return null;
    }
    const message = { prompts: clean };
    if (transition && transition.steps > 0) message.transition = { steps: transition.steps, method: transition.method };
    const sentAt = this.recorder.now();
    try {
      const ack = await this.stream.control(message);
      this.recorder.change(clean, transition, sentAt);
      promptPanel.markLive(this, clean);
      const cut = ack.flushed ? ", hard cut" : message.transition ? `, blending over ${message.transition.steps} chunks` : "";
      say(where, `✓ Applied from chunk ${ack.next_chunk}${cut}`, "ok");
      return ack;
    } catch (err) {
      say(where, `✗ ${err.message}`, "bad");
      return null;
    }
  },

  renderAll() {
    for (const panel of this.panels) panel.render?.(this);
    renderHeader();
  },
};

// ---------------------------------------------------------------------------------------------------
// The stream's lifetime

async function startStream() {
  const note = $("stage-note");
  if (app.model?.state !== "loaded") {
    showStageError(app.model?.state === "loading" ? "The model is still loading…" : "No model is loaded: see Model.");
    return;
  }
  $("start").disabled = true;
  note.className = "stage-note";
  note.textContent = "Starting…";
  let track = null;
  try {
    track = await inputPanel.acquire(app);
    app.stream = new Stream({
      onState: (s) => renderConnection(s),
      onStopped: (reason) => stopStream(reason, { remote: true }),
    });
    const vace = vaceOffer(app);
    await app.stream.start({ track, settings: offerSettings(), prompts: app.state.prompts, vace });
    app.vaceStarted = Boolean(vace);
  } catch (err) {
    if (app.stream) await app.stream.stop("start failed");
    app.stream = null;
    inputPanel.release(app);
    $("start").disabled = false;
    showStageError(`Could not start: ${err.message}`);
    return;
  }
  app.running = true;
  app.paused = false;
  const output = $("output");
  output.srcObject = app.stream.outputStream;
  output.play().catch(() => {});
  app.counter = new FrameCounter(output);
  app.counter.start();
  note.textContent = "Waiting for the first frames…";
  promptPanel.markLive(app, app.state.prompts);
  $("start").disabled = false;
  app.renderAll();
}

function offerSettings() {
  const settings = { mode: app.mode() };
  for (const key of MANAGED) if (key in app.state.settings) settings[key] = app.state.settings[key];
  return settings;
}

async function stopStream(reason = "stopped", { remote = false } = {}) {
  if (!app.stream) return;
  const stream = app.stream;
  if (recordPanel.isRecording()) await recordPanel.stop(app);
  timelinePanel.streamEnded(app);
  app.stream = null;
  app.running = false;
  app.paused = false;
  app.counter?.stop();
  await stream.stop(reason);
  inputPanel.release(app);
  $("output").srcObject = null;
  const note = $("stage-note");
  note.hidden = false;
  note.className = remote ? "stage-note bad" : "stage-note";
  note.textContent = remote ? `The stream ended: ${reason}` : "Stopped. Press ▶ Start to stream again.";
  promptPanel.markLive(app, null);
  app.renderAll();
}

function showStageError(text) {
  const note = $("stage-note");
  note.hidden = false;
  note.className = "stage-note bad";
  note.textContent = text;
}

// Bumped when a pause change is sent and when it is answered: a status poll that overlapped either is
// stale (it may have read the server before the change) and must not undo the change on screen.
let pauseChanges = 0;

async function togglePause() {
  if (!app.running) return;
  const paused = !app.paused;
  pauseChanges++;
  try {
    await app.stream.control({ paused });
    app.paused = paused;
    renderHeader();
  } catch (err) {
    showStageError(`Pause failed: ${err.message}`);
  } finally {
    pauseChanges++;
  }
}

async function resetStream() {
  if (!app.running) return;
  try {
    const ack = await app.stream.control({ reset: true });
    say("prompt-msg", `⟲ Stream restarted (epoch ${ack.epoch})`, "ok");
  } catch (err) {
    showStageError(`Reset failed: ${err.message}`);
  }
}

function renderHeader() {
  $("start").textContent = app.running ? "■ Stop" : "▶ Start";
  $("start").classList.toggle("primary", !app.running);
  $("pause").disabled = $("reset").disabled = !app.running;
  $("pause").textContent = app.paused ? "▶ Resume" : "‖ Pause";
  $("stage").classList.toggle("paused", app.paused);
}

function renderConnection(state) {
  if (state === "connected") $("stage-note").textContent = "Connected, waiting for frames…";
}

// ---------------------------------------------------------------------------------------------------
// Overlay: frames shown per second here, and the estimated glass-to-glass latency

async function pollStream() {
  const fps = $("fps");
  const latency = $("latency");
  if (!app.running) {
    fps.textContent = "— fps";
    latency.textContent = "latency —";
    return;
  }
  let shown = app.counter.fps();
  if (!app.counter.running) shown = await statsFps();
  fps.textContent = `${shown.toFixed(1)} fps`;
  if (shown > 0) $("stage-note").hidden = true;
  try {
    const changesBefore = pauseChanges;
    const status = await app.stream.status();
    if (!status) return;
    const out = status.output || {};
    const stats = status.stats || {};
    if (out.latency_p50 != null) {
      // The server's own estimate (docs/reliability.md): latency + round trip + one frame in and out.
      const total = out.latency_p50 + (status.rtt || 0) + frameTime(stats.input_fps) + frameTime(out.fps);
      latency.textContent = `latency ${total.toFixed(2)} s`;
    } else {
      latency.textContent = app.mode() === "text" ? "text mode" : "latency —";
    }
    if (pauseChanges === changesBefore && app.running) {
      app.paused = Boolean(stats.paused);
      renderHeader();
    }
  } catch {
    // the next poll tries again; a stream that ended says so through its data channel
  }
}

const frameTime = (fps) => (fps ? 1 / fps : 0);

let lastFrames = null;
async function statsFps() {
  const report = await app.stream?.pc?.getStats().catch(() => null);
  if (!report) return 0;
  for (const s of report.values()) {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      const now = { frames: s.framesDecoded || 0, t: s.timestamp };
      const before = lastFrames;
      lastFrames = now;
      if (s.framesPerSecond) return s.framesPerSecond;
      return before && now.t > before.t ? ((now.frames - before.frames) * 1000) / (now.t - before.t) : 0;
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------
// The server: reachable?, restarted?, model state

let asking = false;
async function watchServer() {
  let health;
  try {
    health = await api("/health", { timeout: 4000 });
  } catch (err) {
    const chip = $("server-chip");
    chip.className = "chip bad";
    chip.textContent = "server unreachable";
    banner(err instanceof ApiError && err.status === 401
      ? err.message
      : "The server cannot be reached; retrying. Your prompts, settings and timeline are saved in this browser.", "bad");
    return;
  }
  // serve --random-weights: full-size networks with random weights, for measuring; said on every page.
  banner(health.random_weights
    ? "RANDOM WEIGHTS: this server runs full-size networks with random weights (serve --random-weights) to measure speed and memory; the output is noise, not StreamDiffusionV2."
    : null);
  const previous = app.health;
  app.health = health;
  await checkInstance(health);
  const chip = $("server-chip");
  chip.className = `chip ${health.model === "loaded" ? "ok" : health.model === "error" ? "bad" : "warn"}`;
  // A replay of a take holds a stream slot like a stream.
  const replays = health.replays || 0;
  chip.textContent = `${location.host} · ${health.sessions + replays}/${health.max_sessions} streams`
    + (replays ? ` (${replays} replaying)` : "");
  // Also when the model shown disagrees with the server's (a late answer may have overwritten a newer state).
  if (!previous || previous.model !== health.model || health.model === "loading" || app.model?.state !== health.model) {
    await modelPanel.refresh(app);
  }
}

async function checkInstance(health) {
  const state = app.state;
  if (!state.instance) {
    state.instance = health.instance;
    app.save();
    return;
  }
  if (state.instance === health.instance || asking) return;
  // The server restarted: its streams are gone, and its defaults may differ from the saved work.
  asking = true;
  if (app.stream) await stopStream("the server restarted", { remote: true });
  app.defaults = null;
  if (store.hasWork(state)) {
    const choice = await ask(
      "The server restarted",
      [
        el("p", {}, "Your prompts, settings and timeline from before are saved in this browser."),
        el("p", {}, "Keep them for the new server, or discard them and start from the server's defaults? (Discarded work is set aside once in this browser's storage.)"),
      ],
      [
        { label: "Keep my work", value: "keep", id: "keep-work" },
        { label: "Discard", value: "discard", id: "discard-work" },
      ],
    );
    if (choice === "discard") app.state = store.discard(state);
  }
  app.state.instance = health.instance;
  app.save(true);
  asking = false;
  app.renderAll();
  await settingsPanel.refreshDefaults(app);
}

function banner(text, kind = "warn") {
  const node = $("banner");
  node.hidden = !text;
  node.className = `banner ${kind}`;
  if (text) node.textContent = text;
}

// ---------------------------------------------------------------------------------------------------
// Keyboard

const SHORTCUTS = [
  ["Ctrl+Enter", "apply the prompts"],
  ["Space", "pause / resume"],
  ["Shift+R", "reset (hard cut)"],
  ["T", "play / pause the timeline"],
  ["Home", "timeline back to the start"],
  ["?", "this help"],
];

function showHelp() {
  ask("Keyboard shortcuts",
    el("table", {}, SHORTCUTS.map(([k, what]) => el("tr", {}, el("td", {}, el("kbd", {}, k)), el("td", {}, what)))),
    [{ label: "Close", value: "close" }]);
}

function onKey(e) {
  if ($("dialog").open) return;
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    promptPanel.applyFromEditor(app);
    return;
  }
  if (isTyping(e.target) || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === " ") {
    if (e.target instanceof HTMLInputElement) return; // Space ticks a checkbox, picks a radio
    e.preventDefault();
    if (e.target instanceof HTMLButtonElement) e.target.blur(); // so the key does not also press it
    togglePause();
  } else if (e.key === "R" && e.shiftKey) {
    resetStream();
  } else if (e.key === "t" || e.key === "T") {
    timelinePanel.togglePlay(app);
  } else if (e.key === "Home") {
    timelinePanel.rewind(app);
  } else if (e.key === "?") {
    showHelp();
  }
}

// ---------------------------------------------------------------------------------------------------

async function boot() {
  installTooltips();
  for (const panel of app.panels) panel.init?.(app);
  $("start").addEventListener("click", () => (app.running ? stopStream() : startStream()));
  $("pause").addEventListener("click", togglePause);
  $("reset").addEventListener("click", resetStream);
  $("help-button").addEventListener("click", showHelp);
  document.addEventListener("keydown", onKey);
  addEventListener("pagehide", () => {
    app.save(true);
    app.stream?.beaconClose();
  });
  if (loaded.problem) banner(loaded.problem);
  app.renderAll();
  await watchServer();
  await settingsPanel.refreshDefaults(app);
  app.renderAll();
  setInterval(watchServer, 2000);
  setInterval(pollStream, 1000);
  document.body.dataset.ready = "true"; // for scripts and tests: the studio is wired up
}

app.startStream = startStream;
app.stopStream = stopStream;
window.studio = app; // for the console (and the browser tests)
boot();
