// The console's shell: log in and out, the navigation, the live alert stream, and the
// router that shows one page at a time (#/alerts, #/alerts/ID, #/vms, #/vms/ID,
// #/ledger, #/principals). Pages are modules exporting render(main, params, ctx).

import { ApiError, aborted, api, followAlerts, session } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import * as alerts from "./alerts.js";
import * as ledger from "./ledger.js";
import * as principals from "./principals.js";
import * as vms from "./vms.js";

const ROLE_KEY = "replayguard.role";
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const live = document.getElementById("live");
const logoutButton = document.getElementById("logout");
const listeners = new Set();
const backListeners = new Set();
let stream = null;
let leave = null;
// The shown page's requests: aborted when the route changes (or the analyst logs out).
let requests = null;

const shell = {
  isAdmin: () => sessionStorage.getItem(ROLE_KEY) === "admin",
  /** Calls fn(alert) for every alert the stream sends, until the page changes. */
  onAlert(fn) { listeners.add(fn); return () => listeners.delete(fn); },
  /** Calls fn() whenever the stream goes back (the database went back in time), until the page changes. */
  onBack(fn) { backListeners.add(fn); return () => backListeners.delete(fn); },
};

/** What a page is given: the shell's, and `signal`, which aborts when the page is left. A
 *  page passes it to every read (api(path, { signal: ctx.signal })); a write (acknowledge,
 *  unlock) is not cut short by leaving. */
function pageContext(signal) {
  return { ...shell, signal };
}

// Why the last session ended, when the service ended it: shown once on the login page.
let farewell = "";
const REFUSED = "The service no longer accepts that token (revoked?): log in again.";

function setLive(state) {
  if (state === "revoked") { logout(REFUSED); return; }  // what is on screen goes with the token
  live.hidden = false;
  live.dataset.state = state;
  live.textContent = { live: "● live", reconnecting: "○ reconnecting…", denied: "○ stream refused" }[state] || state;
}

function startStream() {
  stopStream();
  stream = new AbortController();
  followAlerts((alert) => { for (const fn of [...listeners]) fn(alert); }, setLive, stream.signal,
               () => { for (const fn of [...backListeners]) fn(); });
}

function stopStream() {
  if (stream) stream.abort();
  stream = null;
  live.hidden = true;
}

function loggedIn(role) {
  nav.hidden = false;
  logoutButton.hidden = false;
  document.getElementById("nav-principals").hidden = role !== "admin";
  startStream();
}

function logout(why = "") {
  farewell = why;
  logins++;  // a login still in flight is not taken up any more
  if (checking) checking.abort();
  stopStream();
  session.end();
  sessionStorage.removeItem(ROLE_KEY);
  nav.hidden = true;
  logoutButton.hidden = true;
  if (location.hash !== "#/alerts") history.replaceState(null, "", "#/alerts");
  route();
}

// The number of the latest login, and the check of its token in flight. The last login wins:
// an earlier one is aborted, and what it ends with (its role, its error) is dropped. The
// token is kept, with its role, only once the service has said whose it is.
let logins = 0;
let checking = null;

async function login(input, message) {
  const token = input.value.trim();
  input.value = "";
  if (!token) return;
  const mine = ++logins;
  if (checking) checking.abort();
  const check = checking = new AbortController();
  let role;
  try {
    role = (await api("/v1/status", { token, signal: check.signal })).caller.role;
  } catch (error) {
    if (mine !== logins || aborted(error)) return;
    message.textContent = error instanceof ApiError && error.status === 401 ? "That token is unknown or revoked."
      : error instanceof ApiError && error.status === 403 ? "That token may not read alerts: use an analyst or admin token."
      : `Could not reach the service: ${error.message}`;
    return;
  } finally {
    if (checking === check) checking = null;
  }
  if (mine !== logins) return;
  session.save(token);
  sessionStorage.setItem(ROLE_KEY, role);
  loggedIn(role);
  route();
}

function loginPage() {
  const message = h("p", { class: "error", role: "alert", id: "login-message" }, farewell);
  farewell = "";
  const input = h("input", { type: "password", id: "token", autocomplete: "off", spellcheck: "false",
                             placeholder: "rgt_…", "aria-label": "API token" });
  const button = h("button", { type: "button", id: "login" }, "Log in");
  button.addEventListener("click", () => login(input, message));
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") login(input, message); });
  clear(main).append(h("section", { class: "login" },
    h("h1", {}, "replayguard console"),
    h("p", {}, "Paste an analyst or admin token. It is kept in this tab only (sessionStorage) and sent in the Authorization header, never in a URL."),
    h("label", { for: "token" }, "API token"), input, button, message));
  input.focus();
}

const PAGES = { alerts, vms, ledger, principals };

// Each page is drawn into a view of its own, put in <main> when the route is taken: a page
// left while it is still loading (a response in flight when the hash changes or the analyst
// logs out) finishes in its own view, out of the document, and never draws into the next one.
// The number of the latest route: what a page's render ends with is dropped when it is older.
let routes = 0;

async function route() {
  const mine = ++routes;
  if (leave) { leave(); leave = null; }
  if (requests) requests.abort();
  requests = new AbortController();
  const ctx = pageContext(requests.signal);
  listeners.clear();
  if (!session.token()) { loginPage(); return; }
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  // Own names only: "#/constructor" or "#/__proto__" must not find what every object inherits.
  const known = Object.hasOwn(PAGES, name);
  const page = known ? PAGES[name] : alerts;
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.dataset.page === (known ? name : "alerts"));
  const params = rest.map((part) => { try { return decodeURIComponent(part); } catch { return part; } });
  const view = h("div", { class: "view" });
  clear(main).append(view);
  try {
    const done = (await page.render(view, params, ctx)) || null;
    if (mine === routes) leave = done;
    else if (done) done();  // left already: stop what it follows (the stream, its timers)
  } catch (error) {
    if (mine !== routes || aborted(error)) return;
    if (error instanceof ApiError && error.status === 401) { logout(REFUSED); return; }
    view.append(errorBox(error));
  }
}

logoutButton.addEventListener("click", () => logout());
window.addEventListener("hashchange", route);
if (session.token()) loggedIn(sessionStorage.getItem(ROLE_KEY));
route();
