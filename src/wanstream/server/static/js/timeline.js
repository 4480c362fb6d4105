// Timelines in the studio's form (the server's /api/v1/timeline routes convert to and from Scope files):
//   {name, segments: [{start, end, prompts: [{text, weight}], transition_steps, interpolation}], settings}
// Time rules are those of wanstream.timeline: the active segment at t is the last one starting at or before
// t (the first one also before its start), and it stays active through a gap until the next one starts.

const EPS = 1e-6;
export const NEW_SEGMENT_SECONDS = 5;

export function indexAt(segments, t) {
  let index = 0;
  for (let i = 0; i < segments.length; i++) {
    if (segments[i].start <= t + EPS) index = i;
    else break;
  }
  return index;
}

// The end of the last segment (an open-ended one counts as NEW_SEGMENT_SECONDS long for display).
export function duration(timeline) {
  const segs = timeline?.segments || [];
  if (!segs.length) return 0;
  const last = segs.at(-1);
  return last.end ?? last.start + NEW_SEGMENT_SECONDS;
}

// Problems a file would be rejected for, in words, before anything is sent (the server checks again).
export function problems(segments) {
  const found = [];
  segments.forEach((s, i) => {
    const name = `segment ${i + 1}`;
    if (!(s.start >= 0)) found.push(`${name}: the start must be 0 or later`);
    if (s.end != null && !(s.end > s.start)) found.push(`${name}: the end must come after the start`);
    if (!s.prompts.length || s.prompts.some((p) => !p.text.trim())) found.push(`${name}: a prompt is empty`);
    const prev = segments[i - 1];
    if (prev && s.start < (prev.end ?? Infinity) - EPS) found.push(`${name} overlaps the segment before it`);
  });
  return found;
}

export function clonePrompts(prompts) {
  return prompts.map((p) => ({ text: p.text, weight: p.weight }));
}

export function splitAt(segments, index, t) {
  const seg = segments[index];
  const end = seg.end ?? Infinity;
  if (!(t > seg.start + 0.05 && t < end - 0.05)) return null;
  const right = { ...seg, start: round(t), prompts: clonePrompts(seg.prompts) };
  return [...segments.slice(0, index), { ...seg, end: round(t) }, right, ...segments.slice(index + 1)];
}

// Delete a segment; the one before it stretches over its time (or the next one moves back to its start).
export function removeAt(segments, index) {
  if (segments.length <= 1) return null;
  const out = segments.map((s) => ({ ...s }));
  const [gone] = out.splice(index, 1);
  if (index > 0) out[index - 1].end = gone.end;
  else out[0].start = gone.start;
  return out;
}

export function append(segments, prompts) {
  const last = segments.at(-1);
  const start = last ? (last.end ?? last.start + NEW_SEGMENT_SECONDS) : 0;
  const closed = segments.map((s, i) => (i === segments.length - 1 && s.end == null ? { ...s, end: start } : s));
  return [...closed, { start, end: round(start + NEW_SEGMENT_SECONDS), prompts: clonePrompts(prompts), transition_steps: null, interpolation: null }];
}

export const round = (t) => Math.round(t * 1000) / 1000;

// Plays a timeline on the wall clock: `apply(segment, index)` runs when the playhead enters a segment
// (and for the segment under the playhead when play starts).
export class Player {
  constructor({ timeline, apply, onTick = () => {}, onEnd = () => {}, now = () => performance.now() / 1000 }) {
    this.timeline = timeline; // () => the current timeline (edits while playing take effect)
    this.apply = apply;
    this.onTick = onTick;
    this.onEnd = onEnd;
    this.now = now;
    this.position = 0;
    this.playing = false;
    this.loop = false;
    this.current = -1;
    this.origin = 0;
    this.timer = null;
  }

  play() {
    const tl = this.timeline();
    if (!tl || !tl.segments.length) return false;
    if (this.position >= duration(tl) - EPS) this.position = 0;
    this.playing = true;
    this.origin = this.now() - this.position;
    this.current = -1;
    this._tick();
    // A timer rather than animation frames: those stop in a hidden tab, and a show must go on.
    this.timer = setInterval(() => this._tick(), 50);
    return true;
  }

  pause() {
    if (!this.playing) return;
    this._tick();
    this.playing = false;
    clearInterval(this.timer);
    this.onTick(this.position, this.current);
  }

  seek(t) {
    this.position = Math.max(0, t);
    if (this.playing) {
      this.origin = this.now() - this.position;
      this.current = -1;
      this._tick();
    } else {
      this.onTick(this.position, indexAt(this.timeline()?.segments || [], this.position));
    }
  }

  _tick() {
    const tl = this.timeline();
    if (!this.playing || !tl || !tl.segments.length) return;
    const end = duration(tl);
    this.position = this.now() - this.origin;
    if (this.position >= end) {
      if (this.loop) {
        this.origin = this.now();
        this.position = 0;
        this.current = -1;
      } else {
        this.position = end;
        this.playing = false;
        clearInterval(this.timer);
        this.onTick(this.position, this.current);
        this.onEnd();
        return;
      }
    }
    const index = indexAt(tl.segments, this.position);
    if (index !== this.current) {
      this.current = index;
      this.apply(tl.segments[index], index);
    }
    this.onTick(this.position, index);
  }
}

// Captures the prompts applied live into a timeline: each applied change starts a segment at the time it
// was sent, measured from `start()`.
export class LiveRecorder {
  constructor(now = () => performance.now() / 1000) {
    this.now = now;
    this.segments = null;
    this.origin = 0;
  }

  get active() {
    return this.segments !== null;
  }

  elapsed() {
    return this.active ? this.now() - this.origin : 0;
  }

  start(prompts) {
    this.origin = this.now();
    this.segments = [{ start: 0, end: null, prompts: clonePrompts(prompts), transition_steps: null, interpolation: null }];
  }

  // at: the time (this recorder's clock) the change was sent; transition: {steps, method} or null.
  change(prompts, transition, at = this.now()) {
    if (!this.active) return;
    const t = round(Math.max(0, at - this.origin));
    const last = this.segments.at(-1);
    const entry = {
      start: t,
      end: null,
      prompts: clonePrompts(prompts),
      transition_steps: transition && transition.steps > 0 ? transition.steps : null,
      interpolation: transition && transition.steps > 0 ? transition.method : null,
    };
    if (t - last.start < 0.05) {
      this.segments[this.segments.length - 1] = { ...entry, start: last.start }; // replaced at once
    } else {
      last.end = t;
      this.segments.push(entry);
    }
  }

  stop() {
    if (!this.active) return null;
    const segments = this.segments;
    this.segments = null;
    const end = round(Math.max(this.now() - this.origin, segments.at(-1).start + 0.1));
    segments.at(-1).end = end;
    return segments;
  }
}
