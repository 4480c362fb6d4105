// Audio-reactive control, the logic only (no DOM, no WebAudio, so it is testable on its own): features of
// an audio input drive live settings through mappings {source, target, min, max, smoothing}, and the
// result is ordinary live updates, sent over the same channel as every other control (so they are
// validated by the server, and land in the event log and recordings).
//
// Sources: "level" (loudness 0–1), "bass" (low-band loudness 0–1), "onset" (a hit: 1, decaying through
// the smoothing), "beat" (a beat of the server's tempo, tapped or from Ableton Link).
// Targets: "noise_scale", "weight:N" (prompt N's blend weight), "trigger:reset" (a hard cut on each event),
// "trigger:next-prompt" (blend to the next prompt alone on each event, with the prompt panel's transition).

export const SOURCES = ["level", "bass", "onset", "beat"];
export const EVENT_SOURCES = new Set(["onset", "beat"]);
export const MAX_PROMPTS = 8;
export const TARGETS = [
  "noise_scale",
  ...Array.from({ length: MAX_PROMPTS }, (_, i) => `weight:${i + 1}`),
  "trigger:reset",
  "trigger:next-prompt",
];

export function newMapping() {
  return { source: "level", target: "noise_scale", min: 0.4, max: 0.9, smoothing: 0.8 };
}

const clamp01 = (x) => Math.min(1, Math.max(0, x));
const round3 = (x) => Math.round(x * 1000) / 1000;

// One-pole smoothing: 0 follows the input at once, 0.99 moves very slowly (per analysis frame).
export function smooth(previous, value, smoothing) {
  const a = clamp01(Number(smoothing) || 0);
  return previous === undefined ? value : previous * a + value * (1 - a);
}

// Onsets from spectral flux: a hit when the flux rises well above its recent average, at most one per
// `refractory` seconds.
export class OnsetDetector {
  constructor({ sensitivity = 1.6, refractory = 0.12, floor = 0.002 } = {}) {
    this.sensitivity = sensitivity;
    this.refractory = refractory;
    this.floor = floor;
    this.average = 0;
    this.last = -Infinity;
  }

  update(flux, t) {
    const hit = flux > this.average * this.sensitivity + this.floor && t - this.last >= this.refractory;
    this.average = this.average * 0.9 + flux * 0.1;
    if (hit) this.last = t;
    return hit;
  }
}

// The beat crossed between two readings of the tempo's beat counter.
export const beatCrossed = (before, now) => before !== undefined && Math.floor(now) > Math.floor(before);

// One analysis frame through the mappings. `features`: {level, bass, onset: bool, beat: bool};
// `prompts`: the prompts in force [{text, weight}]. Keeps smoothed values in `state`.
// Returns {values: {noise_scale?}, weights: [..] | null, triggers: [..]}.
export function step(state, mappings, features, prompts) {
  state.values ??= [];
  const values = {};
  let weights = null;
  const triggers = [];
  mappings.forEach((m, i) => {
    const event = EVENT_SOURCES.has(m.source);
    if (m.target.startsWith("trigger:")) {
      if (event && features[m.source]) triggers.push(m.target.slice("trigger:".length));
      return;
    }
    const raw = event ? (features[m.source] ? 1 : 0) : clamp01(Number(features[m.source]) || 0);
    // Events jump up at once and fall back through the smoothing (a pulse); levels are smoothed both ways.
    const previous = state.values[i];
    const v = event && raw === 1 ? 1 : smooth(previous, raw, m.smoothing);
    state.values[i] = v;
    const out = round3(Number(m.min) + (Number(m.max) - Number(m.min)) * v);
    if (m.target === "noise_scale") values.noise_scale = out;
    else if (m.target.startsWith("weight:")) {
      const k = Number(m.target.slice("weight:".length)) - 1;
      if (k < prompts.length) {
        weights ??= prompts.map((p) => Number(p.weight));
        weights[k] = Math.max(0, out);
      }
    }
  });
  return { values, weights, triggers };
}

// The live updates for one frame's result: continuous changes in one message (only when they moved by
// `epsilon` since the last one sent, applied at once and without a cut), then one per trigger (these follow
// the server's tempo quantisation). `sent` remembers what was sent; `transition` is {steps, method} or null.
export function messages(result, prompts, sent, { epsilon = 0.01, transition = null } = {}) {
  const out = [];
  const body = {};
  for (const [key, value] of Object.entries(result.values)) {
    if (sent[key] === undefined || Math.abs(sent[key] - value) >= epsilon) body[key] = value;
  }
  if (result.weights) {
    const moved = !sent.weights || result.weights.some((w, i) => Math.abs(w - (sent.weights[i] ?? -1)) >= epsilon);
    if (moved) {
      body.prompts = prompts.map((p, i) => ({ text: p.text, weight: result.weights[i] }));
      body.switch = "refresh"; // a weight drifting must never restart the stream
    }
  }
  if (Object.keys(body).length) {
    body.quantize = "off";
    out.push(body);
  }
  for (const trigger of result.triggers) {
    if (trigger === "reset") out.push({ reset: true });
    else if (trigger === "next-prompt" && prompts.length > 1) {
      sent.solo = ((sent.solo ?? -1) + 1) % prompts.length;
      const next = { prompts: prompts.map((p, i) => ({ text: p.text, weight: i === sent.solo ? 1 : 0 })) };
      if (transition && transition.steps > 0) next.transition = { steps: transition.steps, method: transition.method };
      out.push(next);
    }
  }
  return out;
}

// Record what a message that was accepted changed (so the next frame compares against it).
export function remember(sent, message) {
  if (message.noise_scale !== undefined) sent.noise_scale = message.noise_scale;
  if (message.prompts && message.quantize === "off") sent.weights = message.prompts.map((p) => p.weight);
}
