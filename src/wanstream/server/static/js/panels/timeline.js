// Timeline: import/export Scope timelines (through the server, so files are read and written exactly as
// `wanstream generate --timeline` does), segments on a time axis, a segment editor, playback against the
// live stream, and live capture of the prompts a performer applies.

import { api } from "../api.js";
import { extendButton } from "../extend.js";
import * as model from "../timeline.js";
import { $, el, formatTime, say } from "../ui.js";

let selected = 0;
let player = null;
let editorFor = null; // the segment object the editor shows (rebuilt when it changes)

const timeline = (app) => app.state.timeline;

export function init(app) {
  player = new model.Player({
    timeline: () => timeline(app),
    apply: (segment, index) => sendSegment(app, segment, index),
    onTick: () => renderClock(app),
    onEnd: () => {
      render(app);
      say("timeline-msg", "Timeline finished", "info");
    },
  });
  player.loop = app.state.loop;
  $("timeline-file").addEventListener("change", async (e) => {
    const file = e.target.files?.[0];
    e.target.value = ""; // the same file can be imported again
    if (file) await importFile(app, file);
  });
  $("timeline-export").addEventListener("click", () => exportTimeline(app));
  $("timeline-new").addEventListener("click", () => {
    replaceTimeline(app, {
      name: "untitled",
      segments: [{ start: 0, end: model.NEW_SEGMENT_SECONDS, prompts: model.clonePrompts(app.state.prompts), transition_steps: null, interpolation: null }],
      settings: app.timelineSettings(),
    });
    say("timeline-msg", "New timeline from the current prompts and settings", "ok");
  });
  $("timeline-apply-settings").addEventListener("change", (e) => { app.state.applyTimelineSettings = e.target.checked; app.save(); });
  $("timeline-loop").addEventListener("change", (e) => { app.state.loop = player.loop = e.target.checked; app.save(); });
  $("timeline-play").addEventListener("click", () => togglePlay(app));
  $("timeline-rewind").addEventListener("click", () => rewind(app));
  $("timeline-live").addEventListener("click", () => toggleLive(app));
  $("timeline-take-settings").addEventListener("click", () => {
    if (!timeline(app)) return;
    timeline(app).settings = app.timelineSettings();
    app.save();
    render(app);
    say("timeline-msg", "The timeline now carries the current settings", "ok");
  });
  $("timeline-axis").addEventListener("click", (e) => {
    const tl = timeline(app);
    if (!tl) return;
    const t = (e.clientX - $("timeline-axis").getBoundingClientRect().left) / scale(app);
    selected = model.indexAt(tl.segments, t);
    player.seek(t);
    render(app);
  });
  initEditor(app);
  addEventListener("resize", () => render(app));
}

// ---------------------------------------------------------------------------------------------------
// Playback

export function togglePlay(app) {
  if (player.playing) {
    player.pause();
    render(app);
    return;
  }
  const tl = timeline(app);
  if (!tl?.segments.length) {
    say("timeline-msg", "✗ no timeline: import one, or record your prompts with ● Rec prompts", "bad");
    return;
  }
  if (app.recorder.active) {
    say("timeline-msg", "✗ stop recording prompts before playing the timeline", "bad");
    return;
  }
  if (!app.running) say("timeline-msg", "Not streaming: the playhead moves, but no prompt is sent", "warn");
  player.play();
  render(app);
}

export function rewind(app) {
  player.seek(0);
  selected = 0;
  render(app);
}

async function sendSegment(app, segment, index) {
  selected = index;
  render(app);
  if (!app.running) return;
  const steps = segment.transition_steps || 0;
  const transition = steps > 0 ? { steps, method: segment.interpolation || "linear" } : null;
  const count = timeline(app).segments.length;
  const ack = await app.applyPrompts(segment.prompts, transition, "timeline-msg");
  if (ack) say("timeline-msg", `▶ segment ${index + 1} of ${count} applied from chunk ${ack.next_chunk}`, "ok");
}

export function streamEnded(app) {
  if (player.playing) player.pause();
  if (app.recorder.active) finishLive(app);
}

// ---------------------------------------------------------------------------------------------------
// Live capture of applied prompts

function toggleLive(app) {
  if (app.recorder.active) {
    finishLive(app);
    return;
  }
  if (player.playing) {
    say("timeline-msg", "✗ pause the timeline before recording prompts", "bad");
    return;
  }
  app.recorder.start(app.state.prompts);
  $("timeline-live").setAttribute("aria-pressed", "true");
  say("timeline-msg", app.running
    ? "Recording the prompts you apply (from now). Press ● Rec prompts again to stop."
    : "Recording prompts: start the stream and apply prompts; press ● Rec prompts again to stop.", "info", { keep: true });
  render(app);
}

export function finishLive(app) {
  const segments = app.recorder.stop();
  $("timeline-live").setAttribute("aria-pressed", "false");
  if (!segments) return;
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  replaceTimeline(app, { name: `wanstream-live-${stamp}`, segments, settings: app.timelineSettings() });
  const end = segments.at(-1).end;
  say("timeline-msg", `Recorded ${segments.length} segment${segments.length > 1 ? "s" : ""} (${end.toFixed(1)} s). Export it to replay offline with wanstream generate --timeline.`, "ok", { keep: true });
}

// The previous timeline is kept (one level) so a replaced one can be brought back.
function replaceTimeline(app, next) {
  if (player.playing) player.pause();
  if (timeline(app)?.segments?.length) app.state.timelineBackup = timeline(app);
  app.state.timeline = next;
  selected = 0;
  editorFor = null;
  player.seek(0);
  app.save();
  render(app);
}

// ---------------------------------------------------------------------------------------------------
// Import / export

async function importFile(app, file) {
  let studio;
  try {
    const text = await file.text();
    studio = await api(`/api/v1/timeline/parse?name=${encodeURIComponent(file.name)}`, {
      method: "POST", body: text, headers: { "Content-Type": "application/json" },
    });
  } catch (err) {
    say("timeline-msg", `✗ ${file.name}: ${err.message}`, "bad");
    return;
  }
  replaceTimeline(app, { name: file.name, segments: studio.segments, settings: studio.settings });
  const notes = [];
  if (app.state.applyTimelineSettings) {
    const patch = { ...studio.stream_settings };
    delete patch.mode; // the input (camera / file / text) is the user's choice, not the file's
    const { height, width } = studio.settings;
    if (height && width && height % 16 === 0 && width % 16 === 0) Object.assign(patch, { height, width });
    if (Object.keys(patch).length) {
      const result = await app.changeSettings(patch, "timeline-msg");
      if (result === null) return; // rejected: the reason is shown
      notes.push("its settings applied");
    }
  }
  const mode = studio.settings.input_mode;
  if (mode && mode !== app.mode()) notes.push(`it was made for ${mode} input`);
  const first = studio.segments[0];
  if (app.running) {
    // Scope applies the first segment's prompts on import.
    const ack = await app.applyPrompts(first.prompts, null, "timeline-msg");
    if (!ack) return;
    notes.push("segment 1 is live");
  }
  const length = studio.duration != null ? `${studio.duration.toFixed(1)} s` : "open-ended";
  say("timeline-msg", `✓ Imported ${file.name}: ${studio.segments.length} segments, ${length}${notes.length ? "; " + notes.join("; ") : ""}`, "ok");
}

async function exportTimeline(app) {
  const tl = timeline(app);
  if (!tl?.segments.length) {
    say("timeline-msg", "✗ nothing to export: import a timeline or record one", "bad");
    return;
  }
  const found = model.problems(tl.segments);
  if (found.length) {
    say("timeline-msg", `✗ ${found[0]}`, "bad");
    return;
  }
  let scope;
  try {
    scope = await api("/api/v1/timeline/export", {
      method: "POST", json: { segments: tl.segments, settings: tl.settings || {}, source: tl.name },
    });
  } catch (err) {
    say("timeline-msg", `✗ export: ${err.message}`, "bad");
    return;
  }
  const name = `${(tl.name || "timeline").replace(/\.json$/i, "").replace(/[^\w.-]+/g, "_")}.json`;
  const url = URL.createObjectURL(new Blob([JSON.stringify(scope, null, 2) + "\n"], { type: "application/json" }));
  const link = el("a", { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  say("timeline-msg", `✓ Exported ${name} (Scope timeline v2.1): wanstream generate input.mp4 --timeline ${name}`, "ok", { keep: true });
}

// ---------------------------------------------------------------------------------------------------
// Segment editor

function initEditor(app) {
  const seg = () => timeline(app)?.segments[selected];
  const edited = () => {
    const found = model.problems(timeline(app).segments);
    if (found.length) say("timeline-msg", `⚠ ${found[0]}`, "warn");
    else say("timeline-msg", "", "info");
    app.save();
    render(app);
  };
  $("segment-start").addEventListener("change", (e) => {
    const s = seg();
    const prev = timeline(app).segments[selected - 1];
    const value = model.round(Math.max(0, Number(e.target.value) || 0));
    if (prev && prev.end != null && Math.abs(prev.end - s.start) < 1e-3) prev.end = value; // keep them joined
    s.start = value;
    edited();
  });
  $("segment-end").addEventListener("change", (e) => {
    const s = seg();
    const next = timeline(app).segments[selected + 1];
    const value = e.target.value === "" ? null : model.round(Number(e.target.value));
    if (next && s.end != null && value != null && Math.abs(next.start - s.end) < 1e-3) next.start = value;
    s.end = value;
    edited();
  });
  $("segment-steps").addEventListener("change", (e) => {
    seg().transition_steps = e.target.value === "" ? null : Math.max(0, Math.min(256, Math.round(Number(e.target.value))));
    edited();
  });
  $("segment-method").addEventListener("change", (e) => {
    seg().interpolation = e.target.value || null;
    edited();
  });
  $("segment-add-prompt").addEventListener("click", () => {
    seg().prompts.push({ text: "", weight: 1 });
    editorFor = null;
    edited();
  });
  $("segment-apply").addEventListener("click", () => {
    if (!app.running) {
      say("timeline-msg", "✗ the stream is not running", "bad");
      return;
    }
    sendSegment(app, seg(), selected);
  });
  $("segment-split").addEventListener("click", () => {
    const next = model.splitAt(timeline(app).segments, selected, player.position);
    if (!next) {
      say("timeline-msg", "✗ move the playhead inside this segment to split it", "bad");
      return;
    }
    timeline(app).segments = next;
    editorFor = null;
    edited();
  });
  $("segment-append").addEventListener("click", () => {
    const tl = timeline(app);
    tl.segments = model.append(tl.segments, seg().prompts);
    selected = tl.segments.length - 1;
    editorFor = null;
    edited();
  });
  $("segment-delete").addEventListener("click", () => {
    const next = model.removeAt(timeline(app).segments, selected);
    if (!next) {
      say("timeline-msg", "✗ a timeline keeps at least one segment", "bad");
      return;
    }
    timeline(app).segments = next;
    selected = Math.min(selected, next.length - 1);
    editorFor = null;
    edited();
  });
}

function renderEditor(app) {
  const tl = timeline(app);
  const editor = $("segment-editor");
  const s = tl?.segments[selected];
  editor.hidden = !s;
  if (!s) return;
  $("segment-title").textContent = `Segment ${selected + 1} of ${tl.segments.length}`;
  const set = (id, value) => { if (document.activeElement !== $(id)) $(id).value = value ?? ""; };
  set("segment-start", s.start);
  set("segment-end", s.end);
  set("segment-steps", s.transition_steps);
  set("segment-method", s.interpolation || "");
  if (editorFor === s) return; // the prompt rows already show this segment (and may be being typed in)
  editorFor = s;
  $("segment-prompts").replaceChildren(...s.prompts.map((p, i) => {
    const text = el("textarea", { rows: 2, "aria-label": `segment prompt ${i + 1}`, "data-tip": "A prompt of this segment." });
    text.value = p.text;
    text.addEventListener("input", () => { p.text = text.value; app.save(); renderTrack(app); });
    const weight = el("input", { type: "number", min: "0", max: "1000", step: "0.05", value: p.weight, "aria-label": "weight", "data-tip": "Relative weight of this prompt in the segment." });
    weight.addEventListener("change", () => { p.weight = Math.max(0, Number(weight.value) || 0); app.save(); });
    const remove = el("button", {
      class: "small", disabled: s.prompts.length <= 1, "aria-label": `remove segment prompt ${i + 1}`,
      "data-tip": "Remove this prompt from the segment.",
      onclick: () => { s.prompts.splice(i, 1); editorFor = null; app.save(); render(app); },
    }, "✕");
    const extend = extendButton(p, {
      label: `segment prompt ${i + 1}`,
      get: () => p.text,
      use: (value) => { p.text = value; text.value = value; app.save(); renderTrack(app); },
    });
    return el("div", { class: "prompt-row" }, text, el("label", { class: "weight" }, "weight", weight),
      remove, extend.button, extend.box);
  }));
}

// ---------------------------------------------------------------------------------------------------
// Drawing

function scale(app) {
  const width = $("timeline-axis").clientWidth || 800;
  return width / Math.max(10, model.duration(timeline(app)) * 1.02);
}

function renderTrack(app) {
  const tl = timeline(app);
  const track = $("timeline-track");
  const ruler = $("timeline-ruler");
  if (!tl?.segments.length) {
    track.replaceChildren(el("div", { class: "hint", style: "padding: 10px" }, "No timeline: Import… a Scope timeline, or ● Rec prompts while you perform."));
    ruler.replaceChildren();
    return;
  }
  const px = scale(app);
  const total = $("timeline-axis").clientWidth / px;
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300].find((s) => s * px >= 70) || 600;
  const ticks = [];
  for (let t = 0; t <= total; t += step) {
    ticks.push(el("i", { style: `left:${t * px}px` }), el("span", { style: `left:${t * px}px` }, formatTime(t).replace(/\.0$/, "")));
  }
  ruler.replaceChildren(...ticks);
  const playing = player.playing ? player.current : -1;
  track.replaceChildren(...tl.segments.map((s, i) => {
    const end = s.end ?? s.start + model.NEW_SEGMENT_SECONDS;
    const hue = (i * 67 + 200) % 360;
    const transition = s.transition_steps ? ` · → ${s.transition_steps} ${s.interpolation || ""}` : "";
    const node = el("div", {
      class: `segment${i === selected ? " selected" : ""}${i === playing ? " active" : ""}`,
      style: `left:${s.start * px}px;width:${Math.max(4, (end - s.start) * px - 2)}px;background:hsl(${hue} 70% 72%)`,
      title: s.prompts.map((p) => `${p.text} (${p.weight})`).join("\n"),
      dataset: { index: String(i) },
    }, s.prompts[0]?.text || "(empty)", el("small", {}, `${s.start.toFixed(1)}–${s.end == null ? "…" : s.end.toFixed(1)} s${transition}`));
    return node;
  }));
}

function renderClock(app) {
  const tl = timeline(app);
  $("timeline-clock").textContent = `${formatTime(player.position)} / ${formatTime(model.duration(tl))}`;
  $("timeline-playhead").style.left = `${player.position * scale(app)}px`;
  const playing = player.playing ? player.current : -1;
  for (const node of $("timeline-track").querySelectorAll(".segment")) {
    node.classList.toggle("active", Number(node.dataset.index) === playing);
  }
}

function describeSettings(settings) {
  if (!settings) return "";
  const parts = [];
  if (settings.seed != null) parts.push(`seed ${settings.seed}`);
  if (settings.denoising_steps) parts.push(`steps ${settings.denoising_steps.join(",")}`);
  if (settings.noise_scale != null) parts.push(`noise ${settings.noise_scale}`);
  if (settings.noise_controller != null) parts.push(`controller ${settings.noise_controller ? "on" : "off"}`);
  if (settings.manage_cache != null) parts.push(settings.manage_cache ? "cut on prompt change" : "smooth prompt changes");
  if (settings.height && settings.width) parts.push(`${settings.width}×${settings.height}`);
  if (settings.input_mode) parts.push(`${settings.input_mode} input`);
  return parts.join(" · ");
}

export function render(app) {
  const tl = timeline(app);
  if (tl && selected >= tl.segments.length) selected = tl.segments.length - 1;
  $("timeline-name").textContent = tl ? tl.name : "";
  $("timeline-settings").textContent = describeSettings(tl?.settings);
  $("timeline-apply-settings").checked = app.state.applyTimelineSettings;
  $("timeline-loop").checked = app.state.loop;
  $("timeline-play").textContent = player.playing ? "‖ Pause" : "▶ Play";
  $("timeline-export").disabled = $("timeline-take-settings").disabled = !tl;
  $("timeline-live").setAttribute("aria-pressed", String(app.recorder.active));
  $("timeline-live").textContent = app.recorder.active ? "■ Stop rec" : "● Rec prompts";
  renderTrack(app);
  renderEditor(app);
  renderClock(app);
  renderRestore(app);
}

function renderRestore(app) {
  const old = app.state.timelineBackup;
  $("timeline-restore").replaceChildren(...(old ? [el("button", {
    class: "small", "data-tip": `Bring back the previous timeline (${old.name}).`,
    onclick: () => {
      const current = app.state.timeline;
      app.state.timeline = old;
      app.state.timelineBackup = current;
      selected = 0;
      editorFor = null;
      player.seek(0);
      app.save();
      render(app);
      say("timeline-msg", `Restored ${old.name}`, "ok");
    },
  }, `↶ ${old.name}`)] : []));
}
