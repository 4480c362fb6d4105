// Input: the camera, a video file played in a loop (streamed from its <video>), or no input (text mode).

import { captureScreen, releaseScreen, sharingScreen } from "../screen.js";
import { $, el, say } from "../ui.js";

let cameraStream = null;
let file = null;
let fileUrl = null;

export function init(app) {
  for (const radio of document.querySelectorAll('input[name="input"]')) {
    radio.addEventListener("change", () => choose(app, radio.value));
  }
  $("camera-select").addEventListener("change", (e) => {
    app.state.cameraId = e.target.value;
    app.save();
    if (app.running && app.state.input === "camera") restart(app, "the new camera");
  });
  $("video-file").addEventListener("change", (e) => {
    const picked = e.target.files?.[0];
    if (!picked) return;
    if (!picked.type.startsWith("video/") && !/\.(mp4|m4v|mov|webm|mkv|ogv)$/i.test(picked.name)) {
      say("input-msg", `✗ ${picked.name} is not a video file`, "bad");
      return;
    }
    if (fileUrl) URL.revokeObjectURL(fileUrl);
    file = picked;
    fileUrl = URL.createObjectURL(picked);
    app.state.fileName = picked.name;
    app.save();
    showFilePreview();
    say("input-msg", `${picked.name} ready`, "ok");
    if (app.running && app.state.input === "file") restart(app, picked.name);
  });
  listCameras(app);
  navigator.mediaDevices?.addEventListener?.("devicechange", () => listCameras(app));
}

async function choose(app, kind) {
  app.state.input = kind;
  app.save();
  app.renderAll();
  if (kind === "file" && file) showFilePreview();
  if (app.running) restart(app, { camera: "the camera", file: "the video file", screen: "the screen", text: "text only" }[kind]);
}

// The input of a running stream is part of its WebRTC offer: a new input means a new stream.
async function restart(app, what) {
  if (app.state.input === "file" && !file) {
    say("input-msg", "Choose a video file to stream", "warn");
    return;
  }
  say("input-msg", `Restarting the stream with ${what}…`, "info");
  await app.stopStream("the input changed");
  await app.startStream();
}

// The track to send (null in text mode); errors say what the user can do.
export async function acquire(app) {
  const preview = $("input-preview");
  if (app.state.input === "text") {
    release(app);
    return null;
  }
  if (app.state.input === "file") {
    if (!file) {
      const again = app.state.fileName ? ` (browsers do not keep files across reloads: pick ${app.state.fileName} again)` : "";
      throw fail(`choose a video file first${again}`);
    }
    showFilePreview();
    try {
      await preview.play();
    } catch (err) {
      throw fail(`the video file cannot be played by this browser (${err.message})`);
    }
    const captured = preview.captureStream ? preview.captureStream() : preview.mozCaptureStream?.();
    const track = captured?.getVideoTracks()[0];
    if (!track) throw fail("this browser cannot stream a video file (no captureStream)");
    return track;
  }
  if (app.state.input === "screen") {
    let shared;
    try {
      shared = await captureScreen(() => app.running && app.stopStream("screen sharing stopped"));
    } catch (err) {
      throw fail(err.message);
    }
    preview.removeAttribute("src");
    preview.srcObject = shared.stream;
    $("preview-note").hidden = true;
    return shared.track;
  }
  if (!navigator.mediaDevices?.getUserMedia) {
    throw fail("this page cannot use the camera (it needs http://localhost or https)");
  }
  const video = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } };
  if (app.state.cameraId) video.deviceId = { exact: app.state.cameraId };
  try {
    cameraStream = await navigator.mediaDevices.getUserMedia({ video, audio: false });
  } catch (err) {
    const why = {
      NotAllowedError: "camera permission was denied: allow it in the address bar, then Start again",
      NotFoundError: "no camera was found",
      NotReadableError: "the camera is in use by another program",
      OverconstrainedError: "the chosen camera is not available: pick another one",
    }[err.name] || err.message;
    throw fail(why);
  }
  preview.removeAttribute("src");
  preview.srcObject = cameraStream;
  $("preview-note").hidden = true;
  listCameras(app);
  return cameraStream.getVideoTracks()[0];
}

function fail(text) {
  say("input-msg", `✗ ${text}`, "bad");
  return new Error(text);
}

export function release() {
  if (releaseScreen()) $("input-preview").srcObject = null;
  if (cameraStream) {
    for (const t of cameraStream.getTracks()) t.stop();
    cameraStream = null;
    const preview = $("input-preview");
    preview.srcObject = null;
  }
}

function showFilePreview() {
  const preview = $("input-preview");
  if (!fileUrl) return;
  preview.srcObject = null;
  if (preview.src !== fileUrl) preview.src = fileUrl;
  preview.play().catch(() => {});
  $("preview-note").hidden = true;
}

async function listCameras(app) {
  const select = $("camera-select");
  const devices = await navigator.mediaDevices?.enumerateDevices?.().catch(() => []) || [];
  const cameras = devices.filter((d) => d.kind === "videoinput" && d.deviceId);
  select.replaceChildren(
    el("option", { value: "" }, "default camera"),
    ...cameras.map((d, i) => el("option", { value: d.deviceId }, d.label || `camera ${i + 1}`)),
  );
  select.value = cameras.some((d) => d.deviceId === app.state.cameraId) ? app.state.cameraId : "";
}

export function render(app) {
  const kind = app.state.input;
  for (const radio of document.querySelectorAll('input[name="input"]')) radio.checked = radio.value === kind;
  $("camera-field").hidden = kind !== "camera";
  $("file-field").hidden = kind !== "file";
  const preview = $("input-preview");
  const note = $("preview-note");
  if (kind === "text") {
    preview.pause();
    preview.hidden = true;
    note.hidden = false;
    note.textContent = "text only: the prompts alone make the video";
  } else {
    preview.hidden = false;
    const hasInput = (kind === "camera" && cameraStream) || (kind === "file" && file) || (kind === "screen" && sharingScreen());
    note.hidden = Boolean(hasInput);
    note.textContent = { camera: "the camera shows here once streaming", screen: "the shared screen shows here once streaming" }[kind] || "choose a video file";
    if (kind === "file" && file && preview.paused) showFilePreview();
    if (((kind === "camera" && !cameraStream) || (kind === "screen" && !sharingScreen())) && preview.src) {
      preview.pause();
      preview.removeAttribute("src");
      preview.load();
    }
  }
}
