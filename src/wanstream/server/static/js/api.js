// REST calls to the server that served this page. Errors become ApiError with the server's own words.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

// The server answers {"detail": "..."} or {"detail": {"error": "...", "problems"|"details": [...]}}.
export function describeError(status, body) {
  const detail = body && typeof body === "object" ? body.detail ?? body.error ?? body : body;
  if (typeof detail === "string") return detail;
  if (detail && typeof detail === "object" && typeof detail.error === "string") return detail.error;
  if (Array.isArray(detail)) {
    // FastAPI's own 422: [{loc: [...], msg}]
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  if (status === 401) return "this server needs a token: open the page as /?token=YOUR_TOKEN";
  return `the server answered HTTP ${status}`;
}

export async function api(path, { method = "GET", json, body, headers = {}, timeout = 30000, signal } = {}) {
  const deadline = AbortSignal.timeout(timeout);
  const init = { method, headers: { ...headers }, signal: signal ? AbortSignal.any([deadline, signal]) : deadline };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    const why = err.name === "TimeoutError" ? "no answer in time"
      : err.name === "AbortError" ? "cancelled" : "the server cannot be reached";
    throw new ApiError(0, `${why} (${method} ${path})`, null);
  }
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json().catch(() => null) : await response.text();
  if (!response.ok) throw new ApiError(response.status, describeError(response.status, data), data);
  return data;
}
