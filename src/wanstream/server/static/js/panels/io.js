// I/O: where the stream goes besides this page (server-side outputs: MPEG-TS, NDI, virtual camera, Spout,
// Syphon), what feeds the server's other streams (NDI inputs, files), each output's state and dropped
// frames, and what this machine offers (GET /api/v1/hardware). Outputs added here are remembered and
// added again to the next stream.

import { api } from "../api.js";
import { $, el, say } from "../ui.js";

const KINDS = [
  ["ts", "MPEG-TS (OBS, VLC, ffplay)"],
  ["ndi", "NDI"],
  ["virtualcam", "Virtual camera"],
  ["spout", "Spout (Windows)"],
  ["syphon", "Syphon (macOS)"],
];
const NAMED = new Set(["ndi", "spout", "syphon", "virtualcam"]);
const POLL_MS = 2000;

let hardware = null;
let sessions = [];
let attachedTo = null; // the stream whose remembered outputs were added

const remembered = (app) => (app.state.ioSinks ||= []);

export function init(app) {
  $("io-kind").replaceChildren(...KINDS.map(([value, label]) => el("option", { value }, label)));
  $("io-kind").addEventListener("change", () => renderForm());
  $("io-add").addEventListener("click", () => addFromForm(app));
  $("io-ts-copy").addEventListener("click", () => {
    navigator.clipboard?.writeText($("io-ts-url").textContent).then(
      () => say("io-msg", "MPEG-TS address copied", "ok"),
      () => say("io-msg", "Copy failed: select the address and copy it", "warn"),
    );
  });
  loadHardware();
  setInterval(() => poll(app), POLL_MS);
}

async function loadHardware() {
  try {
    hardware = await api("/api/v1/hardware");
  } catch {
    hardware = null;
  }
  renderHardware();
  renderForm();
}

async function poll(app) {
  try {
    sessions = await api("/api/v1/sessions", { timeout: 4000 });
  } catch {
    return; // the server watch in main.js reports an unreachable server
  }
  const id = app.stream?.sessionId;
  if (app.running && id && attachedTo !== id) {
    attachedTo = id;
    await addRemembered(app, id);
  }
  render(app);
}

// Adding is idempotent: the form may add an output while the remembered ones are being attached to a new
// stream (both run between awaits), so "already there" (409) is success, not an error to show.
async function addSink(id, spec) {
  try {
    await api(`/api/v1/sessions/${id}/sinks`, { method: "POST", json: spec });
  } catch (err) {
    if (err.body?.detail?.code !== "sink_exists") throw err;
  }
}

async function addRemembered(app, id) {
  for (const spec of [...remembered(app)]) {
    try {
      await addSink(id, spec);
    } catch (err) {
      say("io-msg", `✗ ${label(spec)}: ${err.message}`, "bad");
    }
  }
}

async function addFromForm(app) {
  const kind = $("io-kind").value;
  const name = $("io-name").value.trim();
  const spec = NAMED.has(kind) && name ? { kind, name } : { kind };
  const keep = remembered(app);
  if (!keep.some((s) => label(s) === label(spec))) keep.push(spec);
  app.save();
  if (!app.running) {
    say("io-msg", `${label(spec)} saved: it is added when the stream starts`, "info");
    render(app);
    return;
  }
  try {
    await addSink(app.stream.sessionId, spec);
    say("io-msg", `✓ ${label(spec)} added`, "ok");
  } catch (err) {
    say("io-msg", `✗ ${err.message}`, "bad");
  }
  await poll(app);
}

async function remove(app, sink) {
  app.state.ioSinks = remembered(app).filter((s) => label(s) !== sink.id);
  app.save();
  if (app.running && sink.session) {
    try {
      await api(`/api/v1/sessions/${sink.session}/sinks/${encodeURIComponent(sink.id)}`, { method: "DELETE" });
      say("io-msg", `${sink.id} removed`, "ok");
    } catch (err) {
      say("io-msg", `✗ ${err.message}`, "bad");
    }
  }
  await poll(app);
}

// The id the server gives a sink (SinkSpec.id).
function label(spec) {
  if (["ndi", "spout", "syphon"].includes(spec.kind)) return `${spec.kind}:${spec.name || "wanstream"}`;
  return spec.name ? `${spec.kind}:${spec.name}` : spec.kind;
}

export function render(app) {
  const id = app.running ? app.stream?.sessionId : null;
  const mine = sessions.find((s) => s.session_id === id);
  const rows = [];
  if (mine) {
    for (const sink of mine.sinks || []) rows.push(sinkRow(app, { ...sink, session: id }));
  }
  for (const spec of remembered(app)) {
    if (!mine?.sinks?.some((s) => s.id === label(spec))) {
      rows.push(sinkRow(app, { id: label(spec), kind: spec.kind, state: app.running ? "not added" : "when streaming" }));
    }
  }
  $("io-sinks").replaceChildren(...(rows.length ? rows : [el("li", { class: "hint" }, "Only this page: add an output below")]));
  $("io-ts").hidden = !id;
  if (id) $("io-ts-url").textContent = `${location.origin}/api/v1/sessions/${id}/output.ts`;
  const others = sessions.filter((s) => s.session_id !== id);
  $("io-others").hidden = others.length === 0;
  $("io-others-list").replaceChildren(...others.map(otherRow));
}

function sinkRow(app, sink) {
  const bad = sink.state === "error";
  const counts = sink.written !== undefined
    ? ` · ${sink.written} sent · ${sink.dropped} dropped${sink.clients !== undefined ? ` · ${sink.clients} viewers` : ""}`
    : "";
  const where = sink.port ? ` · port ${sink.port}` : sink.device ? ` · ${sink.device}` : "";
  return el("li", { class: "io-row" },
    el("span", { class: `chip ${bad ? "bad" : sink.state === "running" ? "ok" : ""}` }, sink.state),
    el("span", { class: "grow" }, `${sink.id}${where}${counts}`, sink.error ? el("span", { class: "msg bad" }, ` ${sink.error}`) : null),
    el("button", { class: "small", "aria-label": `remove output ${sink.id}`, onclick: () => remove(app, sink) }, "Remove"));
}

function otherRow(session) {
  const input = session.input;
  const source = input
    ? `${session.source} (${input.connected ? "connected" : "waiting"}, ${input.frames} frames${input.problem ? `, ${input.problem}` : ""})`
    : session.source || session.kind;
  const outs = (session.sinks || []).map((s) => `${s.id}: ${s.state}, ${s.dropped} dropped`).join("; ");
  return el("li", {}, `${source} → ${outs || "no server-side output"}`);
}

function renderForm() {
  const kind = $("io-kind").value;
  for (const option of $("io-kind").options) {
    const info = hardware?.io?.[option.value];
    option.disabled = info ? !info.available : false;
    option.title = info?.reason || "";
  }
  const info = hardware?.io?.[kind];
  $("io-name-field").hidden = !NAMED.has(kind);
  $("io-name").placeholder = kind === "virtualcam" ? "device (optional)" : "wanstream";
  $("io-kind-note").textContent = info ? (info.available ? info.reason : `unavailable: ${info.reason}`) : "";
}

function renderHardware() {
  const list = $("io-hardware");
  if (!hardware) {
    list.replaceChildren(el("li", { class: "hint" }, "not known (the server did not answer)"));
    return;
  }
  const gpus = hardware.gpus.length
    ? hardware.gpus.map((g) => `${g.name} · ${(g.vram_bytes / 2 ** 30).toFixed(1)} GiB (${(g.vram_free_bytes / 2 ** 30).toFixed(1)} free)`)
    : ["no GPU (the demo model runs on the CPU)"];
  list.replaceChildren(
    ...gpus.map((g) => el("li", {}, `GPU: ${g}`)),
    ...Object.entries(hardware.io).map(([kind, v]) =>
      el("li", { class: v.available ? "" : "hint" }, `${v.available ? "✓" : "✗"} ${kind} (${v.direction}): ${v.reason}`)),
  );
}
