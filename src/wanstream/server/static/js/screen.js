// Screen capture as an input: the browser's display capture (a screen, a window or a tab), sent to the
// server exactly like a camera (the same WebRTC track, the same path through the engine).

let screenStream = null;

// The track to send; throws an Error whose message says what the user can do. `onEnded` runs when the
// user stops sharing from the browser's own bar.
export async function captureScreen(onEnded) {
  if (!navigator.mediaDevices?.getDisplayMedia) {
    throw new Error("this browser cannot share the screen here (it needs http://localhost or https)");
  }
  try {
    screenStream = await navigator.mediaDevices.getDisplayMedia({
      video: { frameRate: { ideal: 30 }, width: { ideal: 1280 }, height: { ideal: 720 } },
      audio: false,
    });
  } catch (err) {
    const why = {
      NotAllowedError: "screen sharing was cancelled or not allowed",
      NotFoundError: "there is no screen to share",
      NotReadableError: "the screen cannot be captured (another program holds it, or the OS refused)",
    }[err.name] || err.message;
    throw new Error(why);
  }
  const track = screenStream.getVideoTracks()[0];
  track.addEventListener("ended", () => onEnded?.());
  return { stream: screenStream, track };
}

export function releaseScreen() {
  if (!screenStream) return false;
  for (const t of screenStream.getTracks()) t.stop();
  screenStream = null;
  return true;
}

export const sharingScreen = () => screenStream !== null;
