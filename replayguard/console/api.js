// The service's API from the console: the analyst's token lives in sessionStorage and goes
// in the Authorization header only. The alert stream is read with fetch() streaming, not
// EventSource, because EventSource cannot send that header (and a token in the URL would
// land in proxies' and servers' logs).

const KEY = "replayguard.token";

export const session = {
  token: () => sessionStorage.getItem(KEY),
  save: (token) => sessionStorage.setItem(KEY, token),
  end: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.error ? body.error.message : `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.code = body && body.error ? body.error.code : null;
  }
}

function headers(extra, token = session.token()) {
  return { Authorization: `Bearer ${token}`, ...extra };
}

/** Whether `error` is the end of a request its page cancelled (the analyst left the page):
 *  neither an error to show nor a reason to log out. */
export function aborted(error) {
  return error instanceof DOMException && error.name === "AbortError";
}

/**
 * One request to the service with the session's token, or `token` (a login being checked).
 * `signal` cancels it (the page's, from ctx.signal): the request is abandoned, the service
 * stops a verification whose client left, and the promise rejects with an AbortError
 * (`aborted(error)`) even when the answer had already arrived.
 */
export async function api(path, { method = "GET", body, signal, token } = {}) {
  const init = { method, signal, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
                 headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }, token) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  let data = null;
  if (resp.status !== 204) {
    try { data = await resp.json(); } catch { data = null; }
  }
  signal?.throwIfAborted();
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

/** The query string of the non-empty entries of an object. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== "" && value !== null && value !== undefined) q.set(key, value);
  const text = q.toString();
  return text ? "?" + text : "";
}

function parseFrame(frame) {
  const out = { id: null, event: "message", data: "" };
  for (const line of frame.split("\n")) {
    if (line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (field === "id") out.id = value;
    else if (field === "event") out.event = value;
    else if (field === "data") out.data += (out.data ? "\n" : "") + value;
  }
  return out;
}

/** The field a refusal's contract error body names, or null. */
async function refusedField(resp) {
  try { return (await resp.json())?.error?.field ?? null; } catch { return null; }
}

/** The change number an event id of the alert stream names (`<change>.<alert>.<digests>`, or `0`). */
const changeOf = (id) => Number(id.split(".")[0]);

/**
 * Follows /v1/alerts/stream until `signal` aborts: calls onAlert(alert) per event and
 * onState("live" | "reconnecting" | "revoked" | "denied"); resumes with Last-Event-ID after
 * a drop. "revoked" (401: the token is unknown now) and "denied" (403) end it. A resume
 * refused with 400 naming Last-Event-ID (an id the service cannot parse: another version's)
 * drops the id and opens the stream afresh at once, which reads the list again (onBack).
 * The stream opens with its position (an id-only frame, which fires no alert), so a drop
 * before the first alert resumes from there too. An id names the change number, the alert
 * and digests of it (docs/api.md); it goes back to the service as it came. An id whose
 * change number is below the last one means the database went back in time (a restore, a
 * failover to a standby behind): what was read before may be another history, whose alert
 * ids and change numbers come again; onBack() is called before the frame's alert, if any.
 * A stream resumed after a drop sends such an id too (`0`) when the resume shows the
 * database went back, before replaying every change. onBack() is also called each time the
 * stream is open again after a drop: a database that went back while the stream was down,
 * lost changes below the resumed position and then changed that position's alert again
 * past it looks like one whose alert only changed again, and the service goes on after the
 * position (docs/api.md), so what the page listed is read again.
 */
export async function followAlerts(onAlert, onState, signal, onBack = () => {}) {
  let last = null;
  let delay = 1000;
  let opened = false;
  while (!signal.aborted) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (last !== null) extra["Last-Event-ID"] = last;
      const resp = await fetch("/v1/alerts/stream", { headers: headers(extra), signal, cache: "no-store",
                                                       credentials: "omit", referrerPolicy: "no-referrer" });
      if (resp.status === 401) { onState("revoked"); return; }
      if (resp.status === 403) { onState("denied"); return; }
      if (resp.status === 400 && last !== null && await refusedField(resp) === "Last-Event-ID") {
        last = null;  // an id this service cannot take (another version's): open afresh at once
        continue;
      }
      if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
      onState("live");
      delay = 1000;
      if (opened) onBack();  // resumed: what changed meanwhile may be another history
      opened = true;
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = parseFrame(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (frame.id !== null && frame.id !== "") {
            if (last !== null && changeOf(frame.id) < changeOf(last)) onBack();
            last = frame.id;
          }
          if (frame.event === "alert" && frame.data) onAlert(JSON.parse(frame.data));
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    onState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}
