// "Extend" for a prompt: ask the server to extend it (POST /api/v1/prompts/extend), then show the result in an
// editable box under the prompt. Nothing changes until the user presses "Use" (which only replaces the text in
// the editor: sending it to the stream stays an explicit Apply). "Try again" asks with the next seed;
// "Cancel" aborts the request, and the server stops the model.

import { api } from "./api.js";
import { el } from "./ui.js";

const TIMEOUT_MS = 130000; // the server's own limit is 120 s by default

// The widgets of each prompt object, so a panel re-render (a settings change redraws the rows) keeps an
// extension under review, or one in flight, in place.
const widgets = new WeakMap();

// A button (and its review box) for the prompt object `key`: `get()` reads its text, `use(text)` replaces it
// in the editor. The latest options given for `key` are the ones used.
export function extendButton(key, options) {
  let w = widgets.get(key);
  if (!w) {
    w = make(() => w.options);
    widgets.set(key, w);
  }
  w.options = options;
  w.button.setAttribute("aria-label", `extend ${options.label}`);
  w.box.setAttribute("aria-label", `extended ${options.label}`);
  return w;
}

function make(current) {
  const get = () => current().get();
  const use = (text) => current().use(text);
  const box = el("div", { class: "extend-box", hidden: true, role: "group" });
  let seed = 0;
  let controller = null;

  const run = async () => {
    const text = get().trim();
    if (!text) {
      show(el("span", { class: "msg warn" }, "Write a short prompt first, then Extend it."));
      return;
    }
    controller?.abort();
    controller = new AbortController();
    button.disabled = true;
    const cancel = el("button", { class: "small", onclick: () => controller?.abort() }, "Cancel");
    show(el("span", { class: "msg info" }, `Extending (seed ${seed})… `), cancel);
    try {
      const result = await api("/api/v1/prompts/extend", {
        method: "POST", json: { text, seed }, timeout: TIMEOUT_MS, signal: controller.signal,
      });
      review(result);
    } catch (err) {
      const why = controller?.signal.aborted ? "cancelled" : err.message;
      show(el("span", { class: "msg bad", role: "alert" }, `✗ ${why}`), closeButton());
    } finally {
      controller = null;
      button.disabled = false;
    }
  };

  const review = (result) => {
    const area = el("textarea", { rows: 6, "aria-label": `extended ${current().label} (edit before use)` });
    area.value = result.text;
    const where = result.cached ? "from the cache" : `${result.seconds.toFixed(1)} s`;
    const cut = result.truncated ? ", cut to fit" : "";
    const info = el("span", { class: "hint" },
      `${result.umt5_tokens} tokens${cut} · ${result.model} · seed ${result.seed} · ${where}`);
    const useIt = el("button", {
      class: "small primary", "data-tip": "Replace the prompt in the editor with this text (then Apply to send it).",
      onclick: () => { use(area.value); hide(); },
    }, "Use");
    const again = el("button", {
      class: "small", "data-tip": "Ask again with the next seed.", onclick: () => { seed += 1; run(); },
    }, "Try again");
    show(area, el("div", { class: "extend-actions" }, useIt, again, closeButton(), info));
  };

  const closeButton = () => el("button", { class: "small", onclick: hide }, "Discard");
  const show = (...children) => { box.replaceChildren(...children); box.hidden = false; };
  const hide = () => { box.replaceChildren(); box.hidden = true; };

  const button = el("button", {
    class: "small extend-button",
    "data-tip": "Extend this prompt into a detailed paragraph (subject, motion, style, camera, light). You see and edit the result before it is used.",
    onclick: run,
  }, "Extend");
  return { button, box, options: null };
}
