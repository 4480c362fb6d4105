// Model: what is loaded, load progress, and what to do when weights are missing (download, or the demo).

import { api } from "../api.js";
import { $, say } from "../ui.js";
import { refreshDefaults } from "./settings.js";

export function init(app) {
  $("load-weights").addEventListener("click", () => load(app, false));
  $("load-demo").addEventListener("click", () => load(app, true));
  $("copy-command").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("download-command").textContent);
      say("model-msg", "Copied: run it in a terminal on the server, then Load weights", "ok");
    } catch {
      say("model-msg", "Select the command and copy it (the clipboard is not available here)", "warn");
    }
  });
}

async function load(app, demo) {
  if (app.running) {
    say("model-msg", "✗ stop the stream first: a model loads with no stream running", "bad");
    return;
  }
  try {
    const precision = $("load-precision").value;
    app.model = await api("/api/v1/model/load", { method: "POST", json: { demo, precision } });
    say("model-msg", demo ? "Loading the demo model…" : "Loading the weights…", "info");
  } catch (err) {
    say("model-msg", `✗ ${err.message}`, "bad");
  }
  render(app);
}

export async function refresh(app) {
  const before = app.model?.state;
  try {
    app.model = await api("/api/v1/model", { timeout: 5000 });
  } catch {
    return;
  }
  // The selector follows the server at the page's first status and when a load ends, never in between
  // (a poll must not undo the user's choice before they press Load).
  const ended = app.model.state !== "loading" && before === "loading";
  if ((before === undefined || ended) && app.model.precision && !app.model.demo) {
    $("load-precision").value = app.model.precision;
  }
  if (app.model.state === "loaded" && before !== "loaded") await refreshDefaults(app);
  render(app);
}

export function render(app) {
  const m = app.model;
  const chip = $("model-state");
  if (!m) {
    chip.textContent = "…";
    return;
  }
  const labels = { not_loaded: "not loaded", loading: "loading", loaded: "ready", error: "failed" };
  chip.textContent = labels[m.state] || m.state;
  chip.className = `chip ${{ loaded: "ok", loading: "warn", error: "bad" }[m.state] || ""}`;
  const what = m.label || (m.demo ? "demo model (random weights)" : "StreamDiffusionV2");
  const precision = m.precision && !m.demo ? ` · ${m.precision}` : "";
  $("model-label").textContent = m.state === "loaded" ? `${what} · ${m.device}${precision}` : "";
  $("model-progress").hidden = m.state !== "loading";
  const elapsed = m.elapsed_s != null ? ` (${m.elapsed_s.toFixed(0)} s)` : "";
  $("model-stage").textContent = m.state === "loading" ? `${m.stage || "starting"}${elapsed}`
    : m.state === "loaded" && m.random_weights ? "Full-size networks with RANDOM weights, for measuring: the output is noise."
    : m.state === "loaded" && m.demo ? "Demo model: tiny random weights, for trying the studio; the output is not meaningful."
    : m.state === "not_loaded" ? "Load the weights, or the demo model to try the studio without a download."
    : "";
  $("model-download").hidden = !m.download_command;
  $("download-command").textContent = m.download_command || "";
  if (m.state === "error") {
    const first = (m.error || "").split("\n")[0];
    say("model-msg", `✗ ${m.download_command ? "the model weights are missing" : first}`, "bad");
  }
  $("load-weights").disabled = $("load-demo").disabled = $("load-precision").disabled =
    m.state === "loading" || app.running;
}
