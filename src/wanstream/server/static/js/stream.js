// One WebRTC stream: our camera/file track (or none, in text mode) out, the generated video back, and
// live updates on the `parameters` data channel, each answered by an ack or an error with its id.

import { api, ApiError } from "./api.js";

const CONTROL_TIMEOUT_MS = 20000;

export class Stream {
  constructor({ onState = () => {}, onStopped = () => {} } = {}) {
    this.onState = onState;
    this.onStopped = onStopped;
    this.pc = null;
    this.channel = null;
    this.sessionId = null;
    this.outputStream = null;
    this.pending = new Map(); // control id → {resolve, reject, timer}
    this.nextId = 1;
    this.closed = false;
  }

  // track: the MediaStreamTrack to send, or null (text mode); vace: VACE start options or undefined.
  // Resolves once the answer is applied.
  async start({ track, settings, prompts, vace }) {
    const ice = await api("/api/v1/webrtc/ice-servers");
    const pc = new RTCPeerConnection({ iceServers: ice.iceServers || [] });
    this.pc = pc;
    if (track) pc.addTransceiver(track, { direction: "sendrecv" });
    else pc.addTransceiver("video", { direction: "recvonly" });
    this.channel = pc.createDataChannel("parameters", { ordered: true });
    this.channel.onmessage = (e) => this._message(e.data);
    this.outputStream = new MediaStream();
    pc.ontrack = (e) => this.outputStream.addTrack(e.track);
    pc.onconnectionstatechange = () => {
      this.onState(pc.connectionState);
      if (pc.connectionState === "failed") this._ended("the WebRTC connection failed");
    };

    const late = []; // candidates found after the offer went out
    pc.onicecandidate = (e) => {
      if (!e.candidate || !e.candidate.candidate || isMdns(e.candidate.candidate)) return;
      if (this.sessionId) this._trickle([e.candidate]);
      else late.push(e.candidate);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 2500);
    const answer = await api("/api/v1/webrtc/offer", {
      method: "POST",
      json: { sdp: withoutMdns(pc.localDescription.sdp), type: "offer", settings, prompts, vace },
    });
    this.sessionId = answer.session_id;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    const fresh = late.filter((c) => !pc.localDescription.sdp.includes(c.candidate));
    if (fresh.length) this._trickle(fresh);
    return answer.session_id;
  }

  // One live update; resolves to the server's ack, rejects with the server's reason.
  control(message) {
    const id = `c${this.nextId++}`;
    const body = { ...message, id };
    if (!this.channel || this.channel.readyState !== "open") {
      if (!this.sessionId) return Promise.reject(new Error("the stream is not running"));
      return api(`/api/v1/sessions/${this.sessionId}/control`, { method: "POST", json: body });
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error("no answer from the server (the update may still apply)"));
      }, CONTROL_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer });
      this.channel.send(JSON.stringify(body));
    });
  }

  async status() {
    return this.sessionId ? api(`/api/v1/sessions/${this.sessionId}`, { timeout: 5000 }) : null;
  }

  async stop(reason = "stopped") {
    if (this.closed) return;
    this.closed = true;
    const id = this.sessionId;
    this._failPending(reason);
    if (this.pc) this.pc.close();
    if (id) {
      try {
        await api(`/api/v1/sessions/${id}`, { method: "DELETE", timeout: 5000 });
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404)) console.warn("studio: stop:", err.message);
      }
    }
  }

  // The page is going away: a beacon still reaches the server (a fetch may not).
  beaconClose() {
    if (this.sessionId && !this.closed) navigator.sendBeacon(`/api/v1/sessions/${this.sessionId}/close`);
  }

  _message(raw) {
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      return;
    }
    if (msg.type === "stream_stopped") {
      this._ended(msg.reason || "the server stopped the stream");
      return;
    }
    const waiter = msg.id != null ? this.pending.get(msg.id) : null;
    if (!waiter) return;
    this.pending.delete(msg.id);
    clearTimeout(waiter.timer);
    if (msg.type === "error") waiter.reject(Object.assign(new Error(msg.error), { details: msg.details }));
    else waiter.resolve(msg);
  }

  _ended(reason) {
    if (this.closed) return;
    this.closed = true;
    this._failPending(reason);
    if (this.pc) this.pc.close();
    this.onStopped(reason);
  }

  _failPending(reason) {
    for (const { reject, timer } of this.pending.values()) {
      clearTimeout(timer);
      reject(new Error(reason));
    }
    this.pending.clear();
  }

  async _trickle(candidates) {
    try {
      await api(`/api/v1/webrtc/offer/${this.sessionId}`, {
        method: "PATCH",
        json: { candidates: candidates.map((c) => ({ candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex })) },
      });
    } catch (err) {
      console.warn("studio: trickle ICE:", err.message);
    }
  }
}

// Browsers hide their host addresses behind random "….local" names (mDNS). The server could only
// resolve them by multicast, which may go unanswered (Firefox) and stalls its answer. Without them it
// learns the browser's address from the browser's own connectivity checks (peer-reflexive). The offer
// also goes without "end-of-candidates": aiortc answers an offer that ends its candidates with none left
// with no candidates of its own either, and the connection then fails.
const isMdns = (candidate) => /^\S+ \d+ \S+ \d+ \S+\.local /i.test(candidate.replace(/^(a=)?candidate:/, ""));

function withoutMdns(sdp) {
  const dropped = (line) => line === "a=end-of-candidates" || (line.startsWith("a=candidate:") && isMdns(line));
  return sdp.split("\r\n").filter((line) => !dropped(line)).join("\r\n");
}

function gathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

// Frames actually shown by a <video>, per second, over the last two seconds.
export class FrameCounter {
  constructor(video) {
    this.video = video;
    this.times = [];
    this.running = false;
  }

  start() {
    if (this.running || !("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
    this.running = true;
    const tick = (now) => {
      if (!this.running) return;
      this.times.push(now);
      this.video.requestVideoFrameCallback(tick);
    };
    this.video.requestVideoFrameCallback(tick);
  }

  stop() {
    this.running = false;
    this.times = [];
  }

  fps(now = performance.now()) {
    this.times = this.times.filter((t) => now - t < 2000);
    if (this.times.length < 2) return 0;
    const span = (now - this.times[0]) / 1000;
    return span > 0 ? (this.times.length - 1) / span : 0;
  }
}
