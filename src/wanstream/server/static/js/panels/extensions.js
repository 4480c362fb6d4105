// Optional controls that appear when the server's live-update schema has their fields: LoRAs (a list of
// files with scale sliders) and the VACE conditioning scale. A server without them shows neither.

import { api } from "../api.js";
import { $, el } from "../ui.js";

const VACE_KEYS = ["vace_context_scale", "vace_scale"];
let draft = null; // LoRA rows being edited: [{path, scale}]
let available = null; // names the server offers (GET /api/v1/loras), when it has that route

export function init() {}

export function render(app) {
  const props = app.schema?.control?.properties || {};
  const parts = [];
  if (props.loras) parts.push(loraBlock(app));
  const vaceKey = VACE_KEYS.find((k) => props[k]);
  if (vaceKey) parts.push(vaceBlock(app, vaceKey, props[vaceKey]));
  $("extensions").replaceChildren(...parts);
}

function loraBlock(app) {
  if (available === null) {
    available = [];
    api("/api/v1/loras", { timeout: 5000 })
      .then((found) => {
        available = (Array.isArray(found) ? found : found?.loras || []).map((x) => (typeof x === "string" ? x : x.name || x.path));
        render(app);
      })
      .catch(() => {});
  }
  const applied = app.effective().loras || [];
  if (draft === null || !app.state.loraDraftDirty) draft = applied.map((l) => ({ path: l.path, scale: l.scale }));
  const send = () => {
    app.state.loraDraftDirty = false;
    const loras = draft.filter((l) => l.path.trim()).map((l) => ({ path: l.path.trim(), scale: l.scale }));
    app.changeSettings({ loras });
  };
  const rows = draft.map((lora, i) => {
    const path = el("input", {
      type: "text", value: lora.path, placeholder: "style.safetensors", list: "lora-names", "aria-label": "LoRA file",
      "data-tip": "A LoRA file from the server's LoRA folder.",
    });
    path.addEventListener("change", () => { lora.path = path.value; send(); });
    const number = el("input", { type: "number", min: "-10", max: "10", step: "0.05", value: lora.scale, "aria-label": "LoRA scale" });
    const slider = el("input", {
      type: "range", min: "-2", max: "2", step: "0.05", value: lora.scale, "aria-label": "LoRA scale",
      "data-tip": "Strength (0: no effect; -10..10 in the number box).",
    });
    slider.addEventListener("input", () => { number.value = slider.value; });
    slider.addEventListener("change", () => { lora.scale = Number(slider.value); send(); });
    number.addEventListener("change", () => { lora.scale = Number(number.value); slider.value = lora.scale; send(); });
    const remove = el("button", { class: "small", "aria-label": "remove LoRA", onclick: () => { draft.splice(i, 1); send(); } }, "✕");
    return el("div", { class: "prompt-row" }, path, el("span", { class: "weight" }, "scale", slider, number), remove);
  });
  const add = el("button", {
    class: "small", "data-tip": "Add a LoRA (it applies once it has a file name).",
    onclick: () => { draft.push({ path: "", scale: 1 }); app.state.loraDraftDirty = true; render(app); },
  }, "+ LoRA");
  const names = el("datalist", { id: "lora-names" }, (available || []).map((n) => el("option", { value: n })));
  return el("div", { class: "field", "data-tip": "LoRA adapters on the diffusion model, each with its strength." },
    "LoRAs", ...rows, add, names);
}

function vaceBlock(app, key, schema) {
  const value = app.effective()[key] ?? schema.default ?? 1;
  const out = el("output", {}, Number(value).toFixed(2));
  const slider = el("input", { type: "range", min: "0", max: "2", step: "0.05", value, "aria-label": "VACE scale" });
  slider.addEventListener("input", () => { out.value = Number(slider.value).toFixed(2); });
  slider.addEventListener("change", () => app.changeSettings({ [key]: Number(slider.value) }));
  return el("label", {
    class: "field",
    "data-tip": schema.description || "How strongly the VACE conditioning (control video, reference images) steers the output (0: off).",
  }, "VACE scale", out, slider);
}
