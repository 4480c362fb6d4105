// The studio's work (prompts, settings, timeline, choices) kept in localStorage, so a reload or a crash
// loses nothing. `settings` holds only what the user changed: everything else is the server's default.

const KEY = "wanstream.studio.v1";
const DISCARDED_KEY = "wanstream.studio.discarded";

export const DEFAULT_PROMPT = "a cinematic oil painting, vivid colours, soft light, highly detailed";

export function freshState() {
  return {
    version: 1,
    instance: null, // the server instance this work was last used with
    input: "camera",
    cameraId: "",
    prompts: [{ text: DEFAULT_PROMPT, weight: 1 }],
    transition: { steps: 0, method: "slerp" },
    settings: {},
    timeline: null,
    timelineBackup: null,
    applyTimelineSettings: true,
    loop: false,
    recordInput: false,
    recordPrompts: false,
    vace: { enabled: false, use_input_video: true, context_scale: 1, ref_images: [] },
    savedAt: 0,
  };
}

export function load() {
  let raw = null;
  try {
    raw = localStorage.getItem(KEY);
  } catch {
    return { state: freshState(), problem: "this browser blocks local storage: work will not survive a reload" };
  }
  if (!raw) return { state: freshState(), problem: null };
  try {
    const saved = JSON.parse(raw);
    if (!saved || saved.version !== 1) throw new Error("unknown version");
    return { state: { ...freshState(), ...saved }, problem: null };
  } catch (err) {
    localStorage.setItem(DISCARDED_KEY, raw); // unreadable: keep it aside rather than lose it
    return { state: freshState(), problem: `the saved studio state could not be read (${err.message}); it was set aside` };
  }
}

let pending = null;
export function save(state, { now = false } = {}) {
  const write = () => {
    pending = null;
    state.savedAt = Date.now();
    try {
      localStorage.setItem(KEY, JSON.stringify(state));
    } catch {
      // Quota or privacy mode: nothing more to do; the page keeps working.
    }
  };
  clearTimeout(pending);
  if (now) write();
  else pending = setTimeout(write, 150);
}

// Something worth asking about before it is replaced.
export function hasWork(state) {
  const promptsChanged = state.prompts.length !== 1 || state.prompts[0].text !== DEFAULT_PROMPT;
  return promptsChanged || Object.keys(state.settings).length > 0 || Boolean(state.timeline?.segments?.length);
}

// Put the current work aside (one slot) and return a fresh state for this server.
export function discard(state) {
  try {
    localStorage.setItem(DISCARDED_KEY, JSON.stringify(state));
  } catch {
    // nothing to keep it in
  }
  return freshState();
}
