// LoRAs and VACE, shown when the server offers them: LoRAs when live updates take `loras` (names from the
// server's LoRA folder, each with a scale slider), VACE when the loaded model has its module (on/off and the
// control source at start; the scale and reference images live).

import { api } from "../api.js";
import { $, el, say } from "../ui.js";

let draft = []; // LoRA rows shown: [{path, scale}]
let dirty = false; // the rows hold an edit the stream does not have (pending, or refused)
let loraNames = null; // GET /api/v1/loras
let loraInfo = new Map(); // name → provenance (where it came from, trigger words), for files added by link
const adder = { source: "", job: null, note: "", kind: "info", added: null }; // the "add from a link" box
let images = null; // reference images in the media folder (GET /api/v1/media)

export function init() {}

export function render(app) {
  const parts = [];
  if (app.schema?.control?.properties?.loras) parts.push(loraBlock(app));
  if (app.model?.vace) parts.push(vaceBlock(app));
  $("extensions").replaceChildren(...parts);
}

// ---------------------------------------------------------------------------------------------------
// LoRAs: a live setting (`loras` in the stream's settings)

function loraBlock(app) {
  if (loraNames === null) {
    loraNames = [];
    api("/api/v1/loras", { timeout: 5000 })
      .then((found) => {
        loraNames = found.map((x) => x.name);
        loraInfo = new Map(found.filter((x) => x.provenance).map((x) => [x.name, x.provenance]));
        render(app);
      })
      .catch(() => {});
  }
  // The rows follow the stream's LoRAs, except while the user's edit is pending or was refused (then the
  // rows keep what they typed, next to the server's reason).
  if (!dirty) draft = (app.effective().loras || []).map((l) => ({ path: l.path, scale: l.scale }));
  const send = async () => {
    dirty = true;
    const loras = draft.filter((l) => l.path.trim()).map((l) => ({ path: l.path.trim(), scale: l.scale }));
    const result = await app.changeSettings({ loras });
    if (result !== null) dirty = false;
    render(app);
  };
  const rows = draft.map((lora, i) => {
    const path = el("input", {
      type: "text", value: lora.path, placeholder: "style.safetensors", list: "lora-names", "aria-label": "LoRA file",
      "data-tip": "A LoRA file in the server's LoRA folder (wanstream serve --lora-dir DIR).",
    });
    path.addEventListener("change", () => { lora.path = path.value; send(); });
    const number = el("input", {
      type: "number", min: "-10", max: "10", step: "0.05", value: lora.scale, "aria-label": "LoRA scale",
      "data-tip": "Strength, -10 to 10 (0: no effect).",
    });
    const slider = el("input", {
      type: "range", min: "-2", max: "2", step: "0.05", value: lora.scale, "aria-label": "LoRA scale",
      "data-tip": "Strength (0: no effect); the box beside it goes from -10 to 10.",
    });
    slider.addEventListener("input", () => { number.value = slider.value; });
    slider.addEventListener("change", () => { lora.scale = Number(slider.value); send(); });
    number.addEventListener("change", () => { lora.scale = Number(number.value); slider.value = lora.scale; send(); });
    const remove = el("button", {
      class: "small", "aria-label": "remove LoRA", "data-tip": "Remove this LoRA.",
      onclick: () => { draft.splice(i, 1); send(); },
    }, "✕");
    const info = loraInfo.get(lora.path.trim());
    const words = info?.trigger_words?.length
      ? el("span", { class: "hint lora-words" }, `trigger words: ${info.trigger_words.join(", ")}`) : null;
    return el("div", { class: "prompt-row" }, path, el("span", { class: "weight" }, "scale", slider, number), remove, words);
  });
  const add = el("button", {
    class: "small", "data-tip": "Add a LoRA (it applies once it has a file name).",
    onclick: () => { draft.push({ path: "", scale: 1 }); dirty = true; render(app); },
  }, "+ LoRA");
  const hint = loraNames.length ? null
    : el("span", { class: "hint" }, " none on the server (start it with --lora-dir DIR)");
  const names = el("datalist", { id: "lora-names" }, loraNames.map((n) => el("option", { value: n }, describe(n))));
  return el("div", { class: "group", "data-tip": "LoRA adapters on the diffusion model, each with its strength." },
    el("div", { class: "group-title" }, "LoRAs"), ...rows, el("div", {}, add, hint), names, linkAdder(app, () => {
      draft.push({ path: adder.added, scale: 1 });
      adder.added = null;
      send();
    }));
}

function describe(name) {
  const p = loraInfo.get(name);
  if (!p) return name;
  const words = p.trigger_words?.length ? ` · trigger: ${p.trigger_words.join(", ")}` : "";
  return `${name} · from ${p.source}${words}`;
}

// Add a LoRA to the server's folder from a link (POST /api/v1/loras), with progress; then "Use it" picks it.
function linkAdder(app, useAdded) {
  const source = el("input", {
    type: "text", value: adder.source, placeholder: "hf://owner/repo/file.safetensors, civitai:ID or https://…",
    "aria-label": "LoRA link",
    "data-tip": "Paste a Hugging Face (hf://owner/repo/file.safetensors), CivitAI (civitai:MODEL_VERSION_ID) or https link: the server downloads it, checks it fits the model, and records where it came from.",
  });
  source.addEventListener("input", () => { adder.source = source.value; });
  const start = el("button", {
    class: "small", disabled: !!adder.job, onclick: () => addFromLink(app),
    "data-tip": "Download this LoRA into the server's LoRA folder.",
  }, "Add from link");
  const cancel = adder.job ? el("button", {
    class: "small", onclick: () => api(`/api/v1/loras/jobs/${adder.job}`, { method: "DELETE" }).catch(() => {}),
  }, "Cancel") : null;
  const use = adder.added ? el("button", {
    class: "small primary", onclick: useAdded, "data-tip": "Add this LoRA to the stream's LoRAs (scale 1).",
  }, `Use ${adder.added}`) : null;
  const note = el("p", { class: `msg ${adder.kind}`, role: "status", "aria-label": "LoRA download status" }, adder.note);
  return el("div", {}, el("div", { class: "lora-add" }, source, start, cancel), note, use);
}

async function addFromLink(app) {
  const text = adder.source.trim();
  if (!text) return;
  Object.assign(adder, { note: "Starting the download…", kind: "info", added: null });
  try {
    const job = await api("/api/v1/loras", { method: "POST", json: { source: text }, timeout: 30000 });
    adder.job = job.id;
    render(app);
    await follow(app, job.id);
  } catch (err) {
    Object.assign(adder, { job: null, note: `✗ ${err.message}`, kind: "bad" });
    render(app);
  }
}

async function follow(app, id) {
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 400));
    const job = await api(`/api/v1/loras/jobs/${id}`, { timeout: 10000 });
    if (job.state === "running") {
      const total = job.total ? ` of ${(job.total / 1e6).toFixed(1)} MB` : "";
      adder.note = `Downloading: ${(job.bytes / 1e6).toFixed(1)} MB${total}`;
      render(app);
      continue;
    }
    adder.job = null;
    if (job.state === "done") {
      const words = job.lora.trigger_words?.length ? `; trigger words: ${job.lora.trigger_words.join(", ")}` : "";
      Object.assign(adder, { source: "", added: job.lora.name, kind: "ok",
        note: `✓ ${job.lora.name} added (${job.lora.layers} layers, sha256 ${job.lora.sha256.slice(0, 12)}…${words})` });
      loraNames = null; // list the folder again
    } else {
      Object.assign(adder, { note: `✗ ${job.error || job.state}`, kind: "bad" });
    }
    render(app);
    return;
  }
}

// ---------------------------------------------------------------------------------------------------
// VACE: options a stream starts with (`vace` in the offer), then live scale and references

export function vaceOffer(app) {
  const v = app.state.vace;
  if (!app.model?.vace || !v?.enabled) return undefined;
  return { enabled: true, context_scale: v.context_scale, use_input_video: v.use_input_video, ref_images: v.ref_images };
}

async function vaceLive(app, patch, what) {
  if (!app.running) {
    say("settings-msg", `Saved: ${what} applies when the stream starts`, "info");
    return;
  }
  if (!app.vaceStarted) {
    say("settings-msg", "This stream runs without VACE: turn it on and restart the stream (■ Stop, ▶ Start)", "warn");
    return;
  }
  try {
    await app.stream.control(patch);
    say("settings-msg", `✓ ${what} applied`, "ok");
  } catch (err) {
    say("settings-msg", `✗ ${err.message}`, "bad");
  }
}

function vaceBlock(app) {
  app.state.vace ||= { enabled: false, use_input_video: true, context_scale: 1, ref_images: [] };
  const v = app.state.vace;
  const restartNote = () => say("settings-msg", app.running
    ? "VACE start options apply to the next stream: ■ Stop, then ▶ Start"
    : "Saved: applies when the stream starts", "info");
  const enabled = el("input", { type: "checkbox", checked: v.enabled, "aria-label": "VACE on" });
  enabled.addEventListener("change", () => { v.enabled = enabled.checked; app.save(); restartNote(); });
  const source = el("select", { "aria-label": "VACE control source" },
    el("option", { value: "input" }, "input video steers (control)"),
    el("option", { value: "refs" }, "restyle input; references only"));
  source.value = v.use_input_video ? "input" : "refs";
  source.addEventListener("change", () => { v.use_input_video = source.value === "input"; app.save(); restartNote(); });

  const out = el("output", {}, Number(v.context_scale).toFixed(2));
  const scale = el("input", { type: "range", min: "0", max: "2", step: "0.05", value: v.context_scale, "aria-label": "VACE scale" });
  scale.addEventListener("input", () => { out.value = Number(scale.value).toFixed(2); });
  scale.addEventListener("change", () => {
    v.context_scale = Number(scale.value);
    app.save();
    vaceLive(app, { vace_context_scale: v.context_scale }, "VACE scale");
  });

  if (images === null) {
    images = [];
    api("/api/v1/media", { timeout: 5000 })
      .then((found) => { images = found.filter((m) => m.kind === "image").map((m) => m.name); render(app); })
      .catch(() => {});
  }
  const refs = el("select", { multiple: true, size: Math.min(4, Math.max(2, images.length)), "aria-label": "reference images" },
    images.map((name) => el("option", { value: name, selected: v.ref_images.includes(name) }, name)));
  refs.addEventListener("change", () => {
    const chosen = [...refs.selectedOptions].map((o) => o.value).slice(0, 4);
    v.ref_images = chosen;
    app.save();
    vaceLive(app, { vace_ref_images: chosen }, "reference images");
  });

  return el("div", { class: "group", "data-tip": "VACE: steer generation with a control video (the input) and reference images." },
    el("div", { class: "group-title" }, "VACE"),
    el("label", { class: "check", "data-tip": "Start streams with VACE attached (it needs batching 'none', chosen for you)." }, enabled, " VACE on"),
    el("label", { class: "field", "data-tip": "Input video steers the output as a control video (the engine generates from noise, as Scope), or the input is restyled and VACE works from reference images only." }, "Control source", source),
    el("label", { class: "field", "data-tip": "How strongly VACE steers each chunk (0–2); changes apply live." }, "VACE scale", out, scale),
    el("label", { class: "field", "data-tip": "Reference images from the server's media folder (up to 4; Ctrl-click for several). Live." },
      "Reference images", images.length ? refs : el("span", { class: "hint" }, " none in the media folder (--media-dir)")));
}
