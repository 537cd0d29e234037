// Alerts: the filterable list, newest first, kept current by the live stream; and the
// detail of one alert (its history, the ledger entries behind it, its rollback windows
// and the hypervisor events inside them) with acknowledge-with-a-note.

import { aborted, api, query } from "./api.js";
import { badge, clear, errorBox, h, link, table, when } from "./dom.js";

const SEVERITIES = ["", "critical", "warning", "info"];
const STATUSES = ["", "open", "acknowledged"];
const KINDS = ["", "replay_after_rollback", "reuse", "rollback_detected", "clone_detected", "brute_force",
               "clock_regression", "ledger_tamper", "ledger_rollback", "witness_unreachable"];
const filters = { severity: "", kind: "", status: "", vm_id: "", principal: "", since: "", until: "" };

function select(name, options) {
  const el = h("select", { name, id: `f-${name}`, "aria-label": name },
    options.map((value) => h("option", { value }, value || `any ${name}`)));
  el.value = filters[name];
  return el;
}

function input(name, placeholder, type = "text") {
  const el = h("input", { name, id: `f-${name}`, type, placeholder, "aria-label": name });
  el.value = filters[name];
  return el;
}

function toQueryTime(value) {
  return value ? new Date(value + "Z").toISOString() : "";
}

function matches(alert) {
  for (const key of ["severity", "kind", "status", "vm_id", "principal"]) {
    if (filters[key] && alert[key] !== filters[key]) return false;
  }
  if (filters.since && alert.last_seen < toQueryTime(filters.since)) return false;
  if (filters.until && alert.first_seen > toQueryTime(filters.until)) return false;
  return true;
}

function row(alert, selected) {
  const tr = h("tr", { class: `alert-row sev-${alert.severity}${alert.id === selected ? " selected" : ""}`,
                       dataset: { alertId: alert.id } },
    h("td", {}, link(alert.id, "alerts", alert.id)),
    h("td", {}, badge(alert.severity, "sev")),
    h("td", { class: "kind" }, alert.kind),
    h("td", {}, badge(alert.status, "status")),
    h("td", { class: "ident" }, alert.vm_id ?? "—"),
    h("td", { class: "ident" }, alert.principal ?? "—"),
    h("td", { class: "num" }, alert.count),
    h("td", { class: "time" }, when(alert.last_seen)));
  tr.addEventListener("click", (e) => {
    if (e.target.closest("a")) return;
    location.hash = `#/alerts/${encodeURIComponent(alert.id)}`;
  });
  return tr;
}

const byNewest = (a, b) => Number(b.id) - Number(a.id);
const PAGE = 100;

export async function render(main, params, ctx) {
  const selected = params[0] || null;
  let items = [];
  let cursor = null;
  // The id of the oldest alert the loaded pages reach (null: every page is loaded). An alert
  // older than it belongs to a page not loaded yet: "Older alerts" lists it in its place.
  let floor = null;
  // Each filter starts a new list: a page of an earlier one that lands later is dropped.
  let generation = 0;
  // The latest state of every alert seen here, from a page or the stream, by its change (the
  // position of the change in the stream of alert changes): the newest state always wins.
  const known = new Map();
  // For each page load in flight, the ids of the alerts the stream changed since it started:
  // the page was read before those changes, so they are applied on top of it when it lands.
  const loads = new Set();
  const body = h("tbody", { id: "alert-rows" });
  const more = h("button", { type: "button", id: "more", hidden: true }, "Older alerts");
  const listError = h("div");
  const detailPane = h("section", { class: "detail", id: "alert-detail" },
    h("p", { class: "muted" }, "Select an alert to see its evidence."));

  /** The alert's latest known state: the one given, unless a later change of it was seen. */
  const remember = (alert) => {
    const mine = known.get(alert.id);
    if (mine !== undefined && mine.change >= alert.change) return mine;
    known.set(alert.id, alert);
    return alert;
  };
  const listable = (alert) => floor === null || Number(alert.id) >= floor;
  /** Lists, updates or unlists one alert by the filter; false when the list is unchanged. */
  const place = (alert) => {
    const at = items.findIndex((a) => a.id === alert.id);
    if (at >= 0 && matches(alert)) items[at] = alert;
    else if (at >= 0) items.splice(at, 1);  // changed out of the filter (acknowledged while "open" is shown)
    else if (matches(alert) && listable(alert)) items.push(alert);
    else return false;
    return true;
  };
  /** A landed page with every change seen since it was read on top. */
  const settle = (page, changed, append) => {
    cursor = page.next_cursor;
    const last = page.items[page.items.length - 1];
    if (cursor === null) floor = null;
    else if (last !== undefined) floor = Number(last.id);
    if (!append) items = [];
    const read = new Set();
    for (const alert of page.items) {
      read.add(alert.id);
      const latest = remember(alert);
      if (latest.change > alert.change) place(latest);  // changed on the stream after the page was read
      else {
        const at = items.findIndex((a) => a.id === alert.id);
        if (at >= 0) items[at] = alert;
        else items.push(alert);
      }
    }
    for (const id of changed) if (!read.has(id)) place(known.get(id));
    items.sort(byNewest);
  };

  const empty = () => h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No alerts match."));
  const paint = () => {
    clear(body).append(...items.map((a) => row(a, selected)));
    if (!items.length) body.append(empty());
    more.hidden = cursor === null;
  };
  const rowOf = (id) => body.querySelector(`tr[data-alert-id="${CSS.escape(id)}"]`);
  /** Redraws one alert's row after `place` (listed, updated or unlisted), leaving the other
   *  rows as they are: a flood of alerts on the stream (a guest making reuse after reuse)
   *  costs a row each, never the whole list redrawn per alert. Returns its new row. */
  const repaint = (alert) => {
    const at = items.findIndex((a) => a.id === alert.id);
    const old = rowOf(alert.id);
    const tr = at >= 0 ? row(items[at], selected) : null;
    if (old && tr) old.replaceWith(tr);
    else if (old) old.remove();
    else if (tr) body.insertBefore(tr, (at + 1 < items.length && rowOf(items[at + 1].id)) || null);
    for (const placeholder of body.querySelectorAll("tr:not([data-alert-id])")) placeholder.remove();
    if (!items.length) body.append(empty());
    return tr;
  };
  const load = async (append) => {
    if (!append) generation += 1;
    const mine = generation;
    const q = { ...filters, since: toQueryTime(filters.since), until: toQueryTime(filters.until), limit: PAGE };
    if (append && cursor) q.cursor = cursor;
    const changed = new Set();
    loads.add(changed);
    body.setAttribute("aria-busy", "true");
    more.disabled = true;
    clear(listError);
    let failed = false;
    try {
      const page = await api(`/v1/alerts${query(q)}`, { signal: ctx.signal });
      if (mine === generation) settle(page, changed, append);
    } catch (error) {
      if (aborted(error)) return "left";  // the page was left
      failed = true;
      if (mine === generation) listError.append(errorBox(error));
    } finally {
      loads.delete(changed);
      body.setAttribute("aria-busy", String(loads.size > 0));
    }
    if (mine !== generation) return "superseded";  // a later filter's page is loading or shown
    more.disabled = false;
    paint();
    return failed ? "failed" : "loaded";
  };

  const controls = [select("severity", SEVERITIES), select("kind", KINDS), select("status", STATUSES),
                    input("vm_id", "VM"), input("principal", "principal"),
                    input("since", "since", "datetime-local"), input("until", "until", "datetime-local")];
  const apply = h("button", { type: "button", id: "apply" }, "Filter");
  apply.addEventListener("click", () => { for (const c of controls) filters[c.name] = c.value.trim(); load(false); });
  more.addEventListener("click", () => load(true));

  main.append(h("div", { class: "split" },
    h("section", { class: "list" },
      h("h1", {}, "Alerts"),
      h("div", { class: "filters" }, controls, apply),
      listError,
      table(["id", "severity", "kind", "status", "VM", "principal", "count", "last seen"], body, { class: "alerts" }),
      more),
    detailPane));

  // Live changes of the open alert read its detail again, one such read at a time: the
  // changes that come while it is on its way are read by one more read after it. An alert
  // replayed in a loop (each replay a change) costs a read at a time, not a read per change.
  let rereading = false;
  let again = false;
  const reread = async () => {
    if (rereading) { again = true; return; }
    rereading = true;
    try {
      do { again = false; await showDetail(detailPane, selected, ctx.signal); } while (again && !ctx.signal.aborted);
    } finally {
      rereading = false;
    }
  };
  const stop = ctx.onAlert((alert) => {
    if (alert.id === selected) reread();
    if (remember(alert) !== alert) return;  // a page read after this change already listed it
    for (const changed of loads) changed.add(alert.id);
    if (!place(alert)) return;
    items.sort(byNewest);
    repaint(alert)?.classList.add("fresh");
  });
  // The database went back in time: the ids and change numbers seen may name alerts of
  // another history, so what was known is forgotten and the list is read again.
  // A read right after the database went back may fail (the service reconnecting to it):
  // it is tried again, every few seconds, until it lands, the page is left or a filter or a
  // later go-back reads the list anew.
  const stopBack = ctx.onBack(async () => {
    known.clear();
    if (selected) showDetail(detailPane, selected, ctx.signal);
    for (let delay = 500; ; delay = Math.min(delay * 2, 8000)) {
      if ((await load(false)) !== "failed") return;
      const seen = generation;
      await new Promise((resolve) => setTimeout(resolve, delay));
      if (ctx.signal.aborted || generation !== seen) return;
    }
  });
  await load(false);
  if (selected) await showDetail(detailPane, selected, ctx.signal);
  return () => { stop(); stopBack(); };
}

function field(name, value) {
  return [h("dt", {}, name), h("dd", {}, value ?? "—")];
}

// The detail panes whose acknowledgement is on its way: the detail read again meanwhile (after
// a live change) shows the Acknowledge button disabled too, so it is sent (and ledgered) once.
const acking = new WeakSet();

/** Sends the acknowledgement (not aborted by leaving the page: it is the analyst's decision),
 *  then reads the detail again unless the page (`signal`) was left. */
async function acknowledge(id, note, pane, signal) {
  acking.add(pane);
  try {
    await api(`/v1/alerts/${encodeURIComponent(id)}/acknowledge`, { method: "POST", body: { note: note || null } });
  } catch (error) {
    // Refused or unreachable: nothing was recorded, it may be sent again (from the form shown now).
    acking.delete(pane);
    const button = pane.querySelector("#ack");
    if (button) button.disabled = false;
    const message = pane.querySelector("#ack-message");
    if (message) clear(message).append(errorBox(error));
    return;
  }
  acking.delete(pane);
  await showDetail(pane, id, signal);
}

/** The acknowledgement (or the form to make it, its note box holding `typed`). */
function ackForm(alert, pane, typed, signal) {
  if (alert.status !== "open") {
    const ack = alert.acknowledged || {};
    return h("p", { class: "acked", id: "acked" }, `Acknowledged ${when(ack.at)} by `, h("span", { class: "ident" }, ack.by ?? "?"),
      ack.note ? [": ", h("q", { class: "note" }, ack.note)] : null);
  }
  const note = h("textarea", { id: "ack-note", rows: 2, maxlength: 2000, placeholder: "Note (what you found, what you did)" });
  note.value = typed;
  const message = h("div", { id: "ack-message" });
  const button = h("button", { type: "button", id: "ack" }, "Acknowledge");
  button.disabled = acking.has(pane);
  button.addEventListener("click", () => { button.disabled = true; acknowledge(alert.id, note.value, pane, signal); });
  return h("div", { class: "ack" }, note, button, message);
}

// The number of the latest read of each detail pane: a read that lands after a later one
// started (after a live change, or an acknowledgement) is older than it and is dropped.
const reads = new WeakMap();

/** Reads the alert into its detail pane; `signal` (the page's) aborts the read. */
export async function showDetail(pane, id, signal) {
  const mine = (reads.get(pane) || 0) + 1;
  reads.set(pane, mine);
  let alert;
  try {
    alert = await api(`/v1/alerts/${encodeURIComponent(id)}`, { signal });
  } catch (error) {
    if (reads.get(pane) === mine && !aborted(error)) clear(pane).append(errorBox(error));
    return;
  }
  if (reads.get(pane) !== mine) return;
  // Read again after a live change: the note the analyst was typing stays in the box.
  const typed = pane.querySelector("#ack-note")?.value ?? "";
  clear(pane).append(
    h("h2", {}, `Alert ${alert.id} `, badge(alert.severity, "sev"), " ", h("span", { class: "kind" }, alert.kind)),
    h("p", { class: "summary" }, alert.summary),
    h("dl", { class: "facts" },
      field("status", badge(alert.status, "status")),
      field("VM", alert.vm_id ? link(alert.vm_id, "vms", alert.vm_id) : null),
      field("principal", alert.principal ? h("span", { class: "ident" }, alert.principal) : null),
      field("count", String(alert.count)),
      field("first seen", when(alert.first_seen)), field("last seen", when(alert.last_seen))),
    ackForm(alert, pane, typed, signal),
    h("h3", {}, "History"),
    table(["time", "change", "kind", "severity", "seq", "by"], alert.history.map((e) => h("tr", {},
      h("td", { class: "time" }, when(e.time)), h("td", {}, e.change ?? ""), h("td", {}, e.kind ?? ""),
      h("td", {}, e.severity ?? ""), h("td", { class: "num" }, e.seq ?? ""), h("td", { class: "ident" }, e.by ?? "")))),
    h("h3", {}, `Ledger entries behind it (${alert.entries_total})`),
    table(["seq", "time", "kind", "VM", "subject", "decision", "reason", "digest"], alert.entries.map((e) => h("tr", {},
      h("td", { class: "num" }, e.seq), h("td", { class: "time" }, when(e.time)), h("td", {}, e.kind),
      h("td", { class: "ident" }, e.vm_id ?? ""), h("td", { class: "ident" }, e.subject ?? ""),
      h("td", {}, e.decision ?? ""), h("td", {}, e.reason ?? ""),
      h("td", { class: "digest", title: e.digest ?? "" }, e.digest ? e.digest.slice(0, 12) + "…" : "")))),
    h("h3", {}, "Rollback windows"),
    alert.rollback_windows.length ? table(["id", "VM", "start", "end", "cause", "event"], alert.rollback_windows.map((w) => h("tr", { class: "window-row" },
      h("td", { class: "num" }, w.id), h("td", {}, link(w.vm_id, "vms", w.vm_id)),
      h("td", { class: "time" }, w.start ? when(w.start) : "unknown (every earlier use)"), h("td", { class: "time" }, when(w.end)),
      h("td", {}, w.cause), h("td", { class: "ident" }, w.event_id ?? "receipt"))))
      : h("p", { class: "muted" }, "None."),
    h("h3", {}, "Hypervisor events in those windows"),
    alert.hypervisor_events.length ? table(["seq", "received", "type", "VM", "event id"], alert.hypervisor_events.map((e) => h("tr", {},
      h("td", { class: "num" }, e.seq), h("td", { class: "time" }, when(e.received_at)), h("td", {}, e.type),
      h("td", { class: "ident" }, e.vm_id), h("td", { class: "ident" }, e.event_id))))
      : h("p", { class: "muted" }, "None."));
}
