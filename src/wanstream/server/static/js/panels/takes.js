// Takes: a stream's session log. "Save take" downloads it (.wslog, for `wanstream replay`); "Replay take"
// replays it on the server and shows the recording and the replay side by side, with the per-pixel
// difference of the two frames on screen and the server's frame-by-frame verdict.
//
// Both videos are encoded the same way at the same frame times (a bit-exact replay of a recording is the
// very same file), so at any moment both show the same frame: seeking sets both to one time, and the
// difference is drawn from exactly those two frames. While playing, the replay follows the recording and
// the difference is drawn only when both show the same frame.

import { api } from "../api.js";
import { $, formatTime, say } from "../ui.js";

const ACTIVE = new Set(["queued", "running"]);
const POLL_MS = 300;

let sessionId = null; // the take's session: the running stream's, or the last one's after it stopped
let job = null; // the replay being run or shown (GET /api/v1/replays/{job})
let frame = 1 / 16; // one frame's duration in the videos (seconds)
let playing = false;
let shown = { live: -1, replay: -1 }; // the media time of the frame each video shows (while playing)
let drawnAt = null;
let generation = 0; // each play() starts its own frame-callback chains; older ones stop

export function init(app) {
  $("take-save").addEventListener("click", () => saveTake());
  $("take-replay").addEventListener("click", () => replayTake(app));
  $("take-cancel").addEventListener("click", () => cancelReplay(app));
  $("replay-play").addEventListener("click", () => (playing ? pause() : play()));
  $("replay-back").addEventListener("click", () => step(-1));
  $("replay-forward").addEventListener("click", () => step(1));
  $("replay-seek").addEventListener("input", (e) => { pause(false); seekBoth(Number(e.target.value)); });
  $("replay-live").addEventListener("ended", () => pause());
  $("replay-video").addEventListener("ended", () => { if (!hasLive()) pause(); });
}

export function render(app) {
  const current = app.running ? app.stream?.sessionId : null;
  if (current && current !== sessionId) {
    sessionId = current; // a new stream: a new take (the last one's replay is put away)
    if (job && !ACTIVE.has(job.state)) closeView();
  }
  const busy = Boolean(job && ACTIVE.has(job.state));
  $("take-save").disabled = !sessionId;
  $("take-replay").disabled = !sessionId || busy;
  $("take-cancel").hidden = $("take-progress").hidden = !busy;
}

// ---------------------------------------------------------------------------------------------------
// Save take: the session log as a file (the recording's take when there is a recording)

async function saveTake() {
  const id = sessionId;
  if (!id) return;
  const recording = await api(`/api/v1/sessions/${id}/recording`, { timeout: 5000 }).catch(() => null);
  const take = recording && recording.output_frames > 0 ? "recording" : "stream";
  const link = document.createElement("a");
  link.href = `/api/v1/sessions/${id}/log?take=${take}`;
  link.download = `wanstream-${id}.wslog`;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  say("take-msg", take === "recording"
    ? "Saving the recording's take (.wslog): `wanstream replay FILE -o replay.mp4` makes it again"
    : "Saving the stream's take (.wslog): `wanstream replay FILE -o replay.mp4` makes it again", "info");
}

// ---------------------------------------------------------------------------------------------------
// Replay take: a job on the server, polled, then the comparison

async function replayTake(app) {
  const id = sessionId;
  if (!id) return;
  closeView();
  try {
    job = await api(`/api/v1/sessions/${id}/replay`, { method: "POST", json: {} });
  } catch (err) {
    say("take-msg", `✗ ${err.message}`, "bad");
    return;
  }
  const mine = job.job;
  render(app);
  while (job && job.job === mine && ACTIVE.has(job.state)) {
    showProgress(job);
    await new Promise((r) => setTimeout(r, POLL_MS));
    if (!job || job.job !== mine) return; // cancelled meanwhile
    try {
      job = await api(`/api/v1/replays/${mine}`, { timeout: 10000 });
    } catch (err) {
      say("take-msg", `✗ ${err.message}`, "bad");
      job = null;
    }
  }
  render(app);
  if (!job || job.job !== mine) return;
  if (job.state === "done") {
    say("take-msg", `✓ Replayed on the server: ${job.progress.total} calls`, "ok");
    await showComparison(job);
  } else {
    say("take-msg", job.state === "cancelled" ? "Replay cancelled" : `✗ The replay failed: ${job.error}`,
      job.state === "cancelled" ? "info" : "bad");
  }
}

function showProgress(current) {
  const { done, total } = current.progress;
  const bar = $("take-progress");
  bar.value = total ? done / total : 0;
  say("take-msg", current.state === "queued" ? "Replay waiting to start…"
    : total ? `Replaying on the server: ${current.stage}, call ${done} of ${total}…` : `Replaying: ${current.stage}…`,
  "info", { keep: true });
}

async function cancelReplay(app) {
  if (!job) return;
  const id = job.job;
  job = null;
  render(app);
  try {
    await api(`/api/v1/replays/${id}`, { method: "DELETE" });
    say("take-msg", "Replay cancelled", "info");
  } catch (err) {
    say("take-msg", `✗ ${err.message}`, "bad");
  }
}

// The verdict: "N of N frames identical bit for bit", or what differs (the server's report, in full).
function renderVerdict(done) {
  const r = done.report;
  const node = $("replay-verdict");
  const head = document.createElement("strong");
  if (r.compared === 0) {
    head.className = "bad";
    head.textContent = "✗ No frame could be compared: the take has no digests of the frames the stream sent";
  } else {
    head.className = r.bit_exact ? "ok" : "bad";
    head.textContent = `${r.bit_exact ? "✓" : "✗"} ${r.identical} of ${r.compared} frames identical bit for bit`
      + (r.first_mismatch == null ? "" : ` (the first that differs: output frame ${r.first_mismatch})`);
  }
  const from = done.take === "recording" ? "the recording's first frame" : "the stream's first frame";
  const lines = [
    ...r.summary.split("\n").slice(1), // what differs, and why (the first line is the count above)
    ...done.notes,
    `replay.mp4: ${done.frames_written} frames from ${from} (output frame ${done.first_output}), at ${done.fps} fps`,
  ];
  node.replaceChildren(head, ...lines.map((line) => `\n${line}`));
}

// ---------------------------------------------------------------------------------------------------
// The comparison: the recording and the replay, played and sought together, and their difference

const hasLive = () => !$("replay-live-box").hidden;

async function showComparison(done) {
  renderVerdict(done);
  const live = $("replay-live");
  const replay = $("replay-video");
  $("replay-live-box").hidden = $("replay-diff-box").hidden = !done.live_url;
  frame = 1 / (done.fps || 16);
  $("replay-seek").step = String(frame);
  $("replay-diff-note").textContent = done.live_url ? ""
    : "No recording of this stream to compare by eye: the verdict compares every frame the stream sent.";
  $("replay-view").hidden = false;
  const loads = [loaded(replay, done.replay_url)];
  if (done.live_url) loads.push(loaded(live, done.live_url));
  else live.removeAttribute("src");
  try {
    await Promise.all(loads);
  } catch (err) {
    say("take-msg", `✗ ${err.message}`, "bad");
    return;
  }
  $("replay-seek").max = String(duration());
  await seekBoth(0);
}

function loaded(video, url) {
  return new Promise((resolve, reject) => {
    const ok = () => { off(); resolve(); };
    const bad = () => { off(); reject(new Error(`the video ${url} could not be played here`)); };
    const off = () => { video.removeEventListener("loadeddata", ok); video.removeEventListener("error", bad); };
    video.addEventListener("loadeddata", ok);
    video.addEventListener("error", bad);
    video.src = url;
    video.load();
  });
}

function closeView() {
  pause(false);
  $("replay-view").hidden = true;
  $("replay-verdict").replaceChildren();
  for (const id of ["replay-live", "replay-video"]) {
    const video = $(id);
    video.removeAttribute("src");
    video.load();
  }
}

function videos() {
  return hasLive() ? [$("replay-live"), $("replay-video")] : [$("replay-video")];
}

function duration() {
  return Math.max(0, ...videos().map((v) => (Number.isFinite(v.duration) ? v.duration : 0)));
}

// Both videos to the frame shown at time `t`, then the difference of exactly those frames. The seek goes to
// the middle of that frame: at a frame's first instant the two files (their own time bases) may round to
// neighbouring frames.
async function seekBoth(t) {
  const index = Math.floor(Math.min(Math.max(0, t), duration()) / frame + 1e-3);
  const target = Math.min((index + 0.5) * frame, Math.max(0, duration() - frame / 4));
  await Promise.all(videos().map((v) => seek(v, target)));
  $("replay-seek").value = String(target);
  drawDifference();
  showClock();
}

// Resolves once `video` has settled at `t`: a `seeked` of an earlier seek (the replay follows the recording
// while playing) does not count, so the difference is never drawn of a frame still being replaced.
function seek(video, t) {
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); video.removeEventListener("seeked", check); resolve(); };
    const want = Number.isFinite(video.duration) ? Math.min(t, video.duration) : t;
    const check = () => { if (!video.seeking && Math.abs(video.currentTime - want) < 1e-3) done(); };
    const timer = setTimeout(done, 3000); // a seek that never reports must not stall the controls
    video.addEventListener("seeked", check);
    video.currentTime = t;
  });
}

function step(frames) {
  pause(false);
  const at = videos()[0].currentTime;
  seekBoth(at + frames * frame + (frames > 0 ? frame / 4 : 0));
}

async function play() {
  if (playing || $("replay-view").hidden) return;
  const master = videos()[0];
  if (master.currentTime >= duration() - frame / 2) await seekBoth(0);
  playing = true;
  $("replay-play").textContent = "‖ Pause";
  shown = { live: -1, replay: -1 };
  drawnAt = null;
  const mine = ++generation;
  for (const v of videos()) {
    v.play().catch(() => pause());
    if ("requestVideoFrameCallback" in v) watchFrames(v, mine);
  }
  if (!("requestVideoFrameCallback" in master)) requestAnimationFrame(() => followWithoutFrameCallbacks(mine));
}

// While playing: the replay follows the recording, and the difference is drawn when both present the
// same frame (never of two different frames).
function watchFrames(video, mine) {
  const which = video.id === "replay-live" ? "live" : "replay";
  const onFrame = (_now, meta) => {
    if (!playing || mine !== generation) return;
    shown[which] = meta.mediaTime;
    if (which === "live") follow();
    const same = !hasLive() || Math.abs(shown.live - shown.replay) < 1e-3;
    if (same && drawnAt !== shown[which]) {
      drawnAt = shown[which];
      drawDifference();
    }
    showClock();
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function followWithoutFrameCallbacks(mine) {
  if (!playing || mine !== generation) return;
  follow();
  showClock();
  requestAnimationFrame(() => followWithoutFrameCallbacks(mine));
}

function follow() {
  if (!hasLive()) return;
  const live = $("replay-live");
  const replay = $("replay-video");
  if (Math.abs(replay.currentTime - live.currentTime) > frame) replay.currentTime = live.currentTime;
}

function pause(settle = true) {
  const was = playing;
  playing = false;
  $("replay-play").textContent = "▶ Play";
  for (const v of videos()) v.pause();
  // Stopped: both to the recording's moment, and the difference of exactly those two frames.
  if (was && settle) seekBoth(videos()[0].currentTime);
}

function showClock() {
  const t = videos()[0].currentTime;
  $("replay-clock").textContent = `${formatTime(t)} / ${formatTime(duration())}`;
  if (playing) $("replay-seek").value = String(t);
}

const scratch = { live: null, replay: null };

function pixels(video, key) {
  const w = video.videoWidth;
  const h = video.videoHeight;
  let canvas = scratch[key];
  if (!canvas || canvas.width !== w || canvas.height !== h) {
    canvas = scratch[key] = Object.assign(document.createElement("canvas"), { width: w, height: h });
  }
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, w, h);
  return ctx.getImageData(0, 0, w, h);
}

// |live − replay| per pixel and channel; black where the two frames are identical.
function drawDifference() {
  if (!hasLive()) return;
  const live = $("replay-live");
  const replay = $("replay-video");
  const w = replay.videoWidth;
  const h = replay.videoHeight;
  if (!w || !h || live.videoWidth !== w || live.videoHeight !== h) {
    $("replay-diff-note").textContent = "The two videos differ in size: no pixel difference";
    return;
  }
  const a = pixels(live, "live").data;
  const b = pixels(replay, "replay").data;
  const canvas = $("replay-diff");
  if (canvas.width !== w || canvas.height !== h) Object.assign(canvas, { width: w, height: h });
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(w, h);
  const d = out.data;
  let largest = 0;
  let differing = 0;
  for (let i = 0; i < d.length; i += 4) {
    const r = Math.abs(a[i] - b[i]);
    const g = Math.abs(a[i + 1] - b[i + 1]);
    const bl = Math.abs(a[i + 2] - b[i + 2]);
    d[i] = r;
    d[i + 1] = g;
    d[i + 2] = bl;
    d[i + 3] = 255;
    const m = Math.max(r, g, bl);
    if (m) differing++;
    if (m > largest) largest = m;
  }
  ctx.putImageData(out, 0, 0);
  const note = $("replay-diff-note");
  note.dataset.largest = String(largest);
  note.textContent = largest === 0
    ? `This frame (${formatTime(replay.currentTime)}): identical, every pixel (difference 0 of 255)`
    : `This frame (${formatTime(replay.currentTime)}): ${differing} of ${w * h} pixels differ, by up to ${largest} of 255`;
}
