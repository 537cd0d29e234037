// Alerts: the filterable list, newest first, kept current by the live stream and held to
// LIST_CAP alerts (the others a page read away); and the detail of one alert (its history,
// the ledger entries behind it, its rollback windows and the hypervisor events inside them)
// with acknowledge-with-a-note.

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
// The most alerts the list holds: a guest raising alert after alert (its callout token can make
// reuse after reuse) must not grow the page's rows and memory without end. Beyond it the list
// drops the oldest (a live alert) or the newest (an older page), and "Older alerts" or
// "Newer alerts" reads them again. Below the service's largest page (500), so a read that
// reaches past the listed alerts (READ_MAX) always brings new ones.
const LIST_CAP = 400;
const READ_MAX = 500;
// The live changes a page load in flight keeps (to apply on top of the page when it lands):
// beyond them the page is read again, rather than memory growing with a flood.
const CHANGES_CAP = LIST_CAP;
// The cursors of loaded pages kept, to read the alerts below the list after its oldest were dropped.
const MARKS_CAP = 8;

export async function render(main, params, ctx) {
  const selected = params[0] || null;
  let items = [];
  // The read that lists the next older alerts: the cursor (null: from the newest) and the id
  // below which it reads (Infinity from the newest); null when every older alert is listed.
  let next = null;
  // The cursors pages gave, by the id below which each reads, none below `floor`.
  let marks = [];
  // The id of the oldest alert the list reaches (null: every page is loaded). An alert older
  // than it belongs to a page not loaded yet (or dropped): "Older alerts" lists it in its place.
  let floor = null;
  // The id of the newest alert the list holds once older pages pushed the newest out (null: the
  // list reaches the newest, and new alerts are listed as they come): "Newer alerts" reads them.
  let ceiling = null;
  // Each filter starts a new list: a page of an earlier one that lands later is dropped.
  let generation = 0;
  // The database went back in time: the listed alerts may be another history's, so a live
  // change is not compared with them until the list read again lands.
  let forgetful = false;
  // The page loads in flight, each with the latest state of every alert the stream changed
  // since it started: the page was read before those changes, so they go on top of it.
  const loads = new Set();
  const body = h("tbody", { id: "alert-rows" });
  const more = h("button", { type: "button", id: "more", hidden: true }, "Older alerts");
  const newer = h("button", { type: "button", id: "newer", hidden: true }, "Newer alerts");
  const listError = h("div");
  const detailPane = h("section", { class: "detail", id: "alert-detail" },
    h("p", { class: "muted" }, "Select an alert to see its evidence."));

  const listable = (alert) => (floor === null || Number(alert.id) >= floor)
    && (ceiling === null || Number(alert.id) <= ceiling);
  /** Lists, updates or unlists one alert by the filter; false when the list is unchanged. */
  const place = (alert) => {
    const at = items.findIndex((a) => a.id === alert.id);
    if (at >= 0 && matches(alert)) items[at] = alert;
    else if (at >= 0) items.splice(at, 1);  // changed out of the filter (acknowledged while "open" is shown)
    else if (matches(alert) && listable(alert)) items.push(alert);
    else return false;
    return true;
  };
  /** Lists the alerts below `low` next: from the nearest page cursor at or above it, or the newest. */
  const reachBelow = (low) => {
    marks = marks.filter((m) => m.id >= low).sort((a, b) => a.id - b.id).slice(0, MARKS_CAP);
    next = marks[0] ?? { id: Infinity, cursor: null };
  };
  /** Keeps the list within LIST_CAP (sorted newest first): drops the newest (`fromTop`) or the
   *  oldest beyond it, and moves the list's bound past them. Returns what it dropped. */
  const trim = (fromTop) => {
    if (items.length <= LIST_CAP) return [];
    if (fromTop) {
      const dropped = items.splice(0, items.length - LIST_CAP);
      ceiling = Number(items[0].id);
      return dropped;
    }
    const dropped = items.splice(LIST_CAP);
    floor = Number(items[items.length - 1].id);
    reachBelow(floor);
    return dropped;
  };
  /** A landed page with every change seen since it was read on top. */
  const settle = (page, changes, append, fromNewest) => {
    if (!append) { items = []; marks = []; forgetful = false; }
    if (!append || fromNewest) ceiling = null;  // the page reaches the newest
    const last = page.items[page.items.length - 1];
    if (page.next_cursor === null) { next = null; floor = null; marks = []; }
    else if (last !== undefined) {
      const id = Number(last.id);
      floor = append && floor !== null ? Math.min(floor, id) : id;
      marks.push({ id, cursor: page.next_cursor });
      reachBelow(floor);
    }
    const read = new Set();
    for (const alert of page.items) {
      read.add(alert.id);
      const at = items.findIndex((a) => a.id === alert.id);
      const later = [changes.get(alert.id), items[at]].filter((a) => a && a.change > alert.change)
        .sort((a, b) => b.change - a.change)[0];
      if (later) place(later);  // changed on the stream after the page was read
      else if (at >= 0) items[at] = alert;
      else items.push(alert);
    }
    for (const [id, alert] of changes) if (!read.has(id)) place(alert);
    items.sort(byNewest);
    trim(append);
  };

  const empty = () => h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No alerts match."));
  const bounds = () => { more.hidden = next === null; newer.hidden = ceiling === null; };
  const paint = () => {
    clear(body).append(...items.map((a) => row(a, selected)));
    if (!items.length) body.append(empty());
    bounds();
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
    const from = append ? next : null;
    if (from !== null) {
      // The listed alerts below the cursor's id come again: read past them.
      if (from.cursor) q.cursor = from.cursor;
      q.limit = Math.min(READ_MAX, PAGE + items.filter((a) => Number(a.id) < from.id).length);
    }
    const pending = { generation: mine, changes: new Map(), overrun: false };
    for (const other of loads) if (other.generation !== mine) other.changes.clear();  // superseded
    loads.add(pending);
    body.setAttribute("aria-busy", "true");
    more.disabled = true;
    newer.disabled = true;
    clear(listError);
    let failed = false;
    try {
      const page = await api(`/v1/alerts${query(q)}`, { signal: ctx.signal });
      if (mine === generation && !pending.overrun) settle(page, pending.changes, append, from !== null && !from.cursor);
    } catch (error) {
      if (aborted(error)) return "left";  // the page was left
      failed = true;
      if (mine === generation) listError.append(errorBox(error));
    } finally {
      loads.delete(pending);
      body.setAttribute("aria-busy", String(loads.size > 0));
    }
    if (mine !== generation) return "superseded";  // a later filter's page is loading or shown
    if (!failed && pending.overrun) return load(append);  // more changes came than it keeps: read it again
    more.disabled = false;
    newer.disabled = false;
    paint();
    return failed ? "failed" : "loaded";
  };

  const controls = [select("severity", SEVERITIES), select("kind", KINDS), select("status", STATUSES),
                    input("vm_id", "VM"), input("principal", "principal"),
                    input("since", "since", "datetime-local"), input("until", "until", "datetime-local")];
  const apply = h("button", { type: "button", id: "apply" }, "Filter");
  apply.addEventListener("click", () => { for (const c of controls) filters[c.name] = c.value.trim(); load(false); });
  more.addEventListener("click", () => load(true));
  newer.addEventListener("click", () => load(false));

  main.append(h("div", { class: "split" },
    h("section", { class: "list" },
      h("h1", {}, "Alerts"),
      h("div", { class: "filters" }, controls, apply),
      listError,
      newer,
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
    const listed = items.find((a) => a.id === alert.id);
    if (!forgetful && listed && listed.change >= alert.change) return;  // a page read after this change listed it
    for (const pending of loads) {
      if (pending.generation !== generation || pending.overrun) continue;
      if (pending.changes.size >= CHANGES_CAP && !pending.changes.has(alert.id)) {
        pending.overrun = true;  // it is read again when it lands
        pending.changes.clear();
      } else pending.changes.set(alert.id, alert);
    }
    if (!place(alert)) return;
    items.sort(byNewest);
    // At the cap, the oldest go (the newest when older pages pushed the newest out already).
    const dropped = trim(ceiling !== null);
    const tr = repaint(alert);
    for (const gone of dropped) rowOf(gone.id)?.remove();
    tr?.classList.add("fresh");
    bounds();
  });
  // The database went back in time: the ids and change numbers seen may name alerts of
  // another history, so the listed ones are not trusted and the list is read again.
  // A read right after the database went back may fail (the service reconnecting to it):
  // it is tried again, every few seconds, until it lands, the page is left or a filter or a
  // later go-back reads the list anew.
  const stopBack = ctx.onBack(async () => {
    forgetful = true;
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
