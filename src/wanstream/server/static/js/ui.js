// Small DOM helpers: lookups, messages next to the control the user touched, tooltips, dialogs.

export const $ = (id) => {
  const node = document.getElementById(id);
  if (!node) throw new Error(`studio: no element #${id}`);
  return node;
};

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// A message in a panel's status line: kind is ok | bad | warn | info. Errors stay until replaced;
// confirmations fade after a while so a stale "applied" never lies.
const timers = new WeakMap();
export function say(where, text, kind = "info", { keep = kind === "bad" || kind === "warn" } = {}) {
  const node = typeof where === "string" ? $(where) : where;
  clearTimeout(timers.get(node));
  node.textContent = text;
  node.className = `msg ${kind}`;
  if (!keep && text) timers.set(node, setTimeout(() => { node.textContent = ""; }, 8000));
}

// One floating tooltip for every element with data-tip (hover or keyboard focus).
export function installTooltips() {
  const tip = $("tooltip");
  let owner = null;
  const show = (target) => {
    const host = target.closest?.("[data-tip]");
    if (!host || host === owner) return;
    owner = host;
    tip.textContent = host.dataset.tip;
    tip.hidden = false;
    const r = host.getBoundingClientRect();
    const top = r.bottom + 8 + tip.offsetHeight > innerHeight ? r.top - tip.offsetHeight - 8 : r.bottom + 8;
    tip.style.top = `${Math.max(4, top)}px`;
    tip.style.left = `${Math.min(Math.max(4, r.left), innerWidth - tip.offsetWidth - 8)}px`;
  };
  const hide = () => { owner = null; tip.hidden = true; };
  document.addEventListener("mouseover", (e) => show(e.target));
  document.addEventListener("mouseout", (e) => { if (owner && !owner.contains(e.relatedTarget)) hide(); });
  document.addEventListener("focusin", (e) => show(e.target));
  document.addEventListener("focusout", hide);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hide(); });
}

// A modal question; resolves to the value of the button pressed (Escape = the last button's value).
export function ask(title, body, buttons) {
  const dialog = $("dialog");
  $("dialog-title").textContent = title;
  $("dialog-body").replaceChildren(...(Array.isArray(body) ? body : [body]));
  $("dialog-buttons").replaceChildren(
    ...buttons.map((b, i) => el("button", { value: b.value, class: i === 0 ? "primary" : "", id: b.id }, b.label)),
  );
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue || buttons.at(-1).value), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

export function formatTime(seconds) {
  if (!Number.isFinite(seconds)) return "∞";
  const s = Math.max(0, seconds);
  const m = Math.floor(s / 60);
  return `${m}:${(s - m * 60).toFixed(1).padStart(4, "0")}`;
}

const NOT_TEXT = new Set(["checkbox", "radio", "button", "submit", "reset", "range", "file", "color"]);

// Keys go to the field when the user is typing in it (text, numbers, a select's type-ahead).
export function isTyping(target) {
  if (!(target instanceof HTMLElement)) return false;
  if (target.isContentEditable || target.tagName === "TEXTAREA" || target.tagName === "SELECT") return true;
  return target.tagName === "INPUT" && !NOT_TEXT.has(target.type);
}
