// Settings: seed, denoising steps, noise, resolution, autoencoders, batching and prompt-switch behaviour.
// Each change is checked here first (so a bad value never leaves the page), then by the server.

import { api } from "../api.js";
import { $, el, say } from "../ui.js";
import * as extensions from "./extensions.js";

const MAX_STEPS = 4; // the studio's editor; the engine takes up to 8
const SEED_LIMIT = 2 ** 31;

export function init(app) {
  $("seed").addEventListener("change", (e) => {
    const seed = Number(e.target.value);
    if (!Number.isInteger(seed) || seed < 0) {
      say("settings-msg", "✗ the seed is a whole number, 0 or more", "bad");
      render(app);
      return;
    }
    app.changeSettings({ seed });
  });
  $("seed-random").addEventListener("click", () => {
    app.changeSettings({ seed: Math.floor(Math.random() * SEED_LIMIT) });
  });
  $("steps-add").addEventListener("click", () => {
    const steps = [...app.effective().steps];
    if (steps.length >= MAX_STEPS) return;
    const last = steps.at(-1);
    if (last <= 1) {
      say("settings-msg", "✗ no room for another step below the last one", "bad");
      return;
    }
    steps.push(Math.max(1, Math.round(last / 2)));
    setSteps(app, steps);
  });
  $("steps-remove").addEventListener("click", () => {
    const steps = [...app.effective().steps];
    if (steps.length > 1) setSteps(app, steps.slice(0, -1));
  });
  $("steps-preset").addEventListener("change", (e) => {
    if (e.target.value) setSteps(app, e.target.value.split(",").map(Number));
    e.target.value = "";
  });
  $("noise-scale").addEventListener("input", (e) => { $("noise-value").value = Number(e.target.value).toFixed(2); });
  $("noise-scale").addEventListener("change", (e) => app.changeSettings({ noise_scale: Number(e.target.value) }));
  $("noise-controller").addEventListener("change", (e) => app.changeSettings({ noise_controller: e.target.checked }));
  $("resolution-preset").addEventListener("change", (e) => {
    if (e.target.value === "custom") {
      $("height").focus();
      return;
    }
    const [height, width] = e.target.value.split("x").map(Number);
    app.changeSettings({ height, width });
  });
  for (const id of ["height", "width"]) {
    $(id).addEventListener("change", () => {
      const height = Number($("height").value);
      const width = Number($("width").value);
      const bad = [height, width].find((v) => !Number.isInteger(v) || v < 16 || v % 16);
      if (bad !== undefined) {
        const lower = Math.max(16, Math.floor(bad / 16) * 16);
        say("settings-msg", `✗ ${bad} is not a multiple of 16: use ${lower} or ${lower + 16}`, "bad");
        return;
      }
      app.changeSettings({ height, width });
    });
  }
  for (const [id, key] of [["encoder", "encoder"], ["decoder", "decoder"], ["batching", "batching"], ["prompt-switch", "prompt_switch"]]) {
    $(id).addEventListener("change", (e) => app.changeSettings({ [key]: e.target.value }));
  }
  $("settings-defaults").addEventListener("click", async () => {
    const changed = Object.keys(app.state.settings);
    if (!changed.length) {
      say("settings-msg", "Already on the server's defaults", "info");
      return;
    }
    const before = app.effective();
    app.state.settings = {};
    const patch = {};
    const after = app.effective();
    for (const key of changed) if (JSON.stringify(before[key]) !== JSON.stringify(after[key])) patch[key] = after[key];
    app.state.settings = {};
    if (Object.keys(patch).length) await app.changeSettings(patch);
    app.state.settings = {}; // the defaults, not a copy of them: they follow the server
    app.save();
    app.renderAll();
  });
  extensions.init(app);
}

function setSteps(app, steps) {
  const problem = checkSteps(steps);
  if (problem) {
    say("settings-msg", `✗ ${problem}`, "bad");
    render(app);
    return;
  }
  app.changeSettings({ steps });
}

export function checkSteps(steps) {
  if (!steps.length || steps.length > MAX_STEPS) return `give 1 to ${MAX_STEPS} steps`;
  if (steps.some((t) => !Number.isInteger(t) || t <= 0 || t > 1000)) return "each step is a whole number in 1–1000";
  if (steps.some((t, i) => i > 0 && t >= steps[i - 1])) return `steps must go down, e.g. 700, 500 (got ${steps.join(", ")})`;
  return null;
}

function schemaDefaults(schema) {
  const out = {};
  for (const [key, prop] of Object.entries(schema?.properties || {})) if ("default" in prop) out[key] = prop.default;
  return out;
}

export async function refreshDefaults(app) {
  try {
    const schema = await api("/api/v1/settings/schema");
    // Before a model is loaded the server has no stream defaults yet: its settings schema's own defaults.
    app.defaults = schema.defaults || schemaDefaults(schema.schema);
    app.schema = schema;
  } catch {
    // the server is away: the panel keeps what it shows
  }
  render(app);
}

// Rebuilt only when the number of steps changes, so a render never pulls an input from under the cursor.
function renderSteps(app, steps) {
  const list = $("steps-list");
  let inputs = [...list.querySelectorAll("input")];
  if (inputs.length !== steps.length) {
    inputs = steps.map((_, i) => {
      const input = el("input", {
        type: "number", min: "1", max: "1000", step: "1", "aria-label": `step ${i + 1}`,
        "data-tip": `Timestep ${i + 1} of ${steps.length} (1–1000, lower than the one before).`,
      });
      input.addEventListener("change", () => setSteps(app, [...list.querySelectorAll("input")].map((n) => Number(n.value))));
      return input;
    });
    list.replaceChildren(...inputs);
  }
  inputs.forEach((input, i) => { if (document.activeElement !== input) input.value = steps[i]; });
}

export function render(app) {
  const s = app.effective();
  $("seed").value = s.seed;
  renderSteps(app, s.steps);
  $("steps-add").disabled = s.steps.length >= MAX_STEPS;
  $("steps-remove").disabled = s.steps.length <= 1;
  $("noise-scale").value = s.noise_scale;
  $("noise-value").value = Number(s.noise_scale).toFixed(2);
  $("noise-controller").checked = s.noise_controller;
  const text = s.mode === "text";
  $("noise-scale").disabled = $("noise-controller").disabled = $("encoder").disabled = text;
  const key = `${s.height}x${s.width}`;
  const preset = $("resolution-preset");
  preset.value = [...preset.options].some((o) => o.value === key) ? key : "custom";
  $("height").value = s.height;
  $("width").value = s.width;
  const codecs = app.model?.codecs?.length ? app.model.codecs : ["wan", "taehv"];
  for (const id of ["encoder", "decoder"]) {
    for (const option of $(id).options) {
      option.disabled = !codecs.includes(option.value);
      option.textContent = option.textContent.replace(/ \(not loaded\)$/, "") + (option.disabled ? " (not loaded)" : "");
    }
  }
  $("encoder").value = s.encoder;
  $("decoder").value = s.decoder;
  $("batching").value = s.batching;
  $("prompt-switch").value = s.prompt_switch;
  const changed = Object.keys(app.state.settings).length;
  $("settings-state").textContent = changed ? `${changed} changed from the server's defaults` : "server defaults";
  extensions.render(app);
}
