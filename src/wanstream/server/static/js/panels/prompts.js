// Prompts: weighted texts (blended by weight), a transition, and Apply; shows whether the stream has them.

import { extendButton } from "../extend.js";
import { $, el } from "../ui.js";

const MAX_PROMPTS = 8;
let live = null; // JSON of the prompts the stream was last given (null: not streaming)

export function init(app) {
  $("add-prompt").addEventListener("click", () => {
    if (app.state.prompts.length >= MAX_PROMPTS) return;
    app.state.prompts.push({ text: "", weight: 1 });
    app.save();
    render(app);
    document.querySelector("#prompt-list .prompt-row:last-child textarea")?.focus();
  });
  $("transition-steps").addEventListener("change", (e) => {
    const steps = Math.max(0, Math.min(256, Math.round(Number(e.target.value) || 0)));
    app.state.transition.steps = steps;
    e.target.value = steps;
    app.save();
  });
  $("transition-method").addEventListener("change", (e) => {
    app.state.transition.method = e.target.value;
    app.save();
  });
  $("apply-prompts").addEventListener("click", () => applyFromEditor(app));
}

export function applyFromEditor(app) {
  return app.applyPrompts(app.state.prompts, app.state.transition, "prompt-msg");
}

export function markLive(app, prompts) {
  live = prompts ? JSON.stringify(prompts.map((p) => [p.text, Number(p.weight)])) : null;
  updateState(app);
}

function updateState(app) {
  const node = $("prompt-state");
  if (live === null) {
    node.textContent = "";
    return;
  }
  const mine = JSON.stringify(app.state.prompts.map((p) => [p.text, Number(p.weight)]));
  node.textContent = mine === live ? "● live" : "edited: Apply to send (Ctrl+Enter)";
  node.style.color = mine === live ? "var(--ok)" : "var(--warn)";
}

export function render(app) {
  const list = $("prompt-list");
  const prompts = app.state.prompts;
  list.replaceChildren(...prompts.map((p, i) => row(app, p, i, prompts.length)));
  $("add-prompt").disabled = prompts.length >= MAX_PROMPTS;
  $("transition-steps").value = app.state.transition.steps;
  $("transition-method").value = app.state.transition.method;
  updateState(app);
}

function row(app, prompt, index, count) {
  const changed = () => {
    app.save();
    updateState(app);
  };
  const number = el("input", {
    type: "number", min: "0", max: "1000", step: "0.05", value: prompt.weight, "aria-label": "weight",
    "data-tip": "This prompt's weight, relative to the others (they are normalised to sum to 1).",
  });
  const slider = el("input", {
    type: "range", min: "0", max: "4", step: "0.05", value: Math.min(4, prompt.weight), "aria-label": "weight",
    "data-tip": "This prompt's weight, relative to the others.",
  });
  number.addEventListener("input", () => {
    prompt.weight = Math.max(0, Math.min(1000, Number(number.value) || 0));
    slider.value = Math.min(4, prompt.weight);
    changed();
  });
  slider.addEventListener("input", () => {
    prompt.weight = Number(slider.value);
    number.value = prompt.weight;
    changed();
  });
  const text = el("textarea", {
    rows: 3, placeholder: "Describe the look: long, detailed prompts work best", "aria-label": `prompt ${index + 1}`,
    "data-tip": "A prompt: describe the scene and style. Long, detailed prompts work best.",
  });
  text.value = prompt.text;
  text.addEventListener("input", () => {
    prompt.text = text.value;
    changed();
  });
  const remove = el("button", {
    class: "small", disabled: count <= 1, "aria-label": `remove prompt ${index + 1}`, "data-tip": "Remove this prompt.",
    onclick: () => {
      app.state.prompts.splice(index, 1);
      app.save();
      render(app);
    },
  }, "✕");
  const extend = extendButton(prompt, {
    label: `prompt ${index + 1}`,
    get: () => prompt.text,
    use: (value) => { prompt.text = value; text.value = value; changed(); },
  });
  return el("div", { class: "prompt-row" }, text,
    el("span", { class: "weight" }, "weight", slider, number),
    remove, extend.button, extend.box);
}
