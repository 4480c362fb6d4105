// Recording: the generated video (and optionally the input) to MP4 on the server, then a download link;
// optionally the prompts applied meanwhile into the timeline, on the same clock.

import { api } from "../api.js";
import { $, el, formatTime, say } from "../ui.js";
import { finishLive } from "./timeline.js";

let recording = false;
let startedAt = 0;
let clock = null;
let ownsRecorder = false;

export function init(app) {
  $("record").addEventListener("click", () => (recording ? stop(app) : start(app)));
  $("record-input").addEventListener("change", (e) => { app.state.recordInput = e.target.checked; app.save(); });
  $("record-prompts").addEventListener("change", (e) => { app.state.recordPrompts = e.target.checked; app.save(); });
}

export const isRecording = () => recording;

async function start(app) {
  if (!app.running) return;
  try {
    await api(`/api/v1/sessions/${app.stream.sessionId}/recording/start`, {
      method: "POST",
      json: { include_input: app.state.recordInput },
    });
  } catch (err) {
    say("record-msg", `✗ ${err.message}`, "bad");
    return;
  }
  recording = true;
  startedAt = performance.now();
  ownsRecorder = false;
  if (app.state.recordPrompts && !app.recorder.active) {
    app.recorder.start(app.state.prompts);
    ownsRecorder = true;
  }
  clock = setInterval(() => { $("record-time").textContent = `● ${formatTime((performance.now() - startedAt) / 1000)}`; }, 200);
  say("record-msg", ownsRecorder ? "Recording video and the prompts you apply…" : "Recording…", "info", { keep: true });
  render(app);
}

export async function stop(app) {
  if (!recording) return;
  recording = false;
  clearInterval(clock);
  $("record-time").textContent = "";
  let info = null;
  const base = `/api/v1/sessions/${app.stream.sessionId}/recording`;
  try {
    info = await api(`${base}/stop`, { method: "POST" });
  } catch (err) {
    // A stream that already ended has had its recording finished by the server: fetch what it kept.
    info = await api(base).catch(() => null);
    if (!info) say("record-msg", `✗ ${err.message}`, "bad");
  }
  if (ownsRecorder) {
    ownsRecorder = false;
    finishLive(app);
  }
  render(app);
  if (!info) return;
  const links = [
    el("a", { href: info.output_url, download: "wanstream-output.mp4", id: "download-output" },
      `↓ output.mp4 (${info.output_frames} frames)`),
  ];
  if (info.input_url) {
    links.push(el("a", { href: info.input_url, download: "wanstream-input.mp4", id: "download-input" },
      `↓ input.mp4 (${info.input_frames} frames)`));
  }
  $("downloads").replaceChildren(...links);
  const dropped = info.dropped_frames ? ` (${info.dropped_frames} frames dropped by a busy encoder)` : "";
  say("record-msg", info.output_frames ? `Recording ready${dropped}` : "Nothing was recorded: no frames arrived", info.output_frames ? "ok" : "warn");
}

export function render(app) {
  const button = $("record");
  button.disabled = !app.running;
  button.textContent = recording ? "■ Stop recording" : "● Record";
  button.setAttribute("aria-pressed", String(recording));
  $("record-input").checked = app.state.recordInput;
  $("record-prompts").checked = app.state.recordPrompts;
  $("record-input").disabled = $("record-prompts").disabled = recording;
}
