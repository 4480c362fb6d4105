// MIDI control, the logic only (testable without a device): raw MIDI messages from the browser's Web MIDI
// API become events, a learn step binds the next knob or pad to a mapping, and bound events become the
// same live updates every other control channel sends.
//
// A mapping: {control: {kind: "cc" | "note", channel, number} | null, target, min, max}. Targets:
//   noise_scale, weight:N (continuous, from a knob / fader: 0–127 → min–max),
//   prompt:N (prompt N alone, with the prompt panel's transition), reset, pause, tap (tap tempo).
// Continuous targets apply at once; prompt slots and resets follow the server's tempo quantisation, so a
// pad pressed during the bar switches on the downbeat.

import { MAX_PROMPTS } from "./audiomap.js";

export const TARGETS = [
  "noise_scale",
  ...Array.from({ length: MAX_PROMPTS }, (_, i) => `weight:${i + 1}`),
  ...Array.from({ length: MAX_PROMPTS }, (_, i) => `prompt:${i + 1}`),
  "reset",
  "pause",
  "tap",
];

export function newMapping() {
  return { control: null, target: "noise_scale", min: 0, max: 1 };
}

// A MIDI message (the bytes of a MIDIMessageEvent) as {kind, channel (1-16), number, value (0-127)};
// note-on with velocity 0 is a note-off (null: not a control change or a note-on).
export function parse(data) {
  if (!data || data.length < 3) return null;
  const type = data[0] & 0xf0;
  const channel = (data[0] & 0x0f) + 1;
  if (type === 0xb0) return { kind: "cc", channel, number: data[1], value: data[2] };
  if (type === 0x90 && data[2] > 0) return { kind: "note", channel, number: data[1], value: data[2] };
  return null;
}

export const describe = (control) =>
  control ? `${control.kind === "cc" ? "CC" : "note"} ${control.number} · ch ${control.channel}` : "not bound";

const same = (control, event) =>
  control && control.kind === event.kind && control.channel === event.channel && control.number === event.number;

// Learning: the first event binds the mapping being learned (returns true when it did).
export function learn(mapping, event) {
  if (!event) return false;
  mapping.control = { kind: event.kind, channel: event.channel, number: event.number };
  return true;
}

// What an event does through the mappings: {values: {noise_scale?}, weights: [..] | null, actions: [..]}.
export function apply(mappings, event, prompts) {
  const values = {};
  let weights = null;
  const actions = [];
  for (const m of mappings) {
    if (!event || !same(m.control, event)) continue;
    const scaled = Math.round((Number(m.min) + ((Number(m.max) - Number(m.min)) * event.value) / 127) * 1000) / 1000;
    if (m.target === "noise_scale") values.noise_scale = scaled;
    else if (m.target.startsWith("weight:")) {
      const k = Number(m.target.slice(7)) - 1;
      if (k < prompts.length) {
        weights ??= prompts.map((p) => Number(p.weight));
        weights[k] = Math.max(0, scaled);
      }
    } else if (event.kind === "note" || event.value >= 64) {
      actions.push(m.target); // a pad, or a button sending CC 127 (a release, CC 0, does nothing)
    }
  }
  return { values, weights, actions };
}

// The live updates for one event's result; `tap` is left to the caller (it is a tempo, not a stream, action).
export function messages(result, prompts, { transition = null, paused = false } = {}) {
  const out = [];
  const body = { ...result.values };
  if (result.weights) {
    body.prompts = prompts.map((p, i) => ({ text: p.text, weight: result.weights[i] }));
    body.switch = "refresh";
  }
  if (Object.keys(body).length) out.push({ ...body, quantize: "off" });
  for (const action of result.actions) {
    if (action === "reset") out.push({ reset: true });
    else if (action === "pause") out.push({ paused: !paused });
    else if (action.startsWith("prompt:")) {
      const k = Number(action.slice(7)) - 1;
      if (k >= prompts.length) continue;
      const next = { prompts: prompts.map((p, i) => ({ text: p.text, weight: i === k ? 1 : 0 })) };
      if (transition && transition.steps > 0) next.transition = { steps: transition.steps, method: transition.method };
      out.push(next);
    }
  }
  return out;
}
