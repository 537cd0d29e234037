// VMs: the list (epoch, rollbacks, open alerts, refusing), and one VM's timeline — the
// SVG picture (timeline.js) above the same entries as a table.

import { aborted, api, query } from "./api.js";
import { badge, clear, errorBox, h, link, table, when } from "./dom.js";
import { draw, legend } from "./timeline.js";

const MAX_PAGES = 5;

export async function render(main, params, ctx) {
  if (params[0]) return renderTimeline(main, params[0], ctx);
  let cursor = null;
  const body = h("tbody", { id: "vm-rows" });
  const more = h("button", { type: "button", id: "more", hidden: true }, "More VMs");
  const listError = h("div");
  let loading = false;
  // One page at a time (the button is disabled meanwhile): the next page is asked for, and
  // listed, once.
  const load = async () => {
    if (loading) return;
    loading = true;
    more.disabled = true;
    try {
      const page = await api(`/v1/vms${query({ limit: 200, cursor })}`, { signal: ctx.signal });
      body.append(...page.items.map((vm) => h("tr", { dataset: { vmId: vm.vm_id } },
        h("td", {}, link(vm.vm_id, "vms", vm.vm_id)),
        h("td", { class: "num" }, vm.epoch), h("td", { class: "num" }, vm.rollbacks),
        h("td", { class: "num" }, vm.open_alerts),
        h("td", {}, vm.refusing ? badge(`refusing (${vm.refusing_reason ?? "?"})`, "refusing") : "no"),
        h("td", { class: "time" }, when(vm.first_seen)), h("td", { class: "time" }, when(vm.last_seen)))));
      cursor = page.next_cursor;
      more.hidden = cursor === null;
    } finally {
      loading = false;
      more.disabled = false;
    }
  };
  more.addEventListener("click", () => {
    clear(listError);
    load().catch((error) => { if (!aborted(error)) listError.append(errorBox(error)); });
  });
  main.append(h("h1", {}, "VMs"),
    table(["VM", "epoch", "rollbacks", "open alerts", "refusing", "first seen", "last seen"], body, { class: "vms" }),
    listError, more);
  await load();
  return null;
}

async function loadTimeline(vmId, signal) {
  let items = [];
  let after = 0;
  let windows = [];
  for (let i = 0; i < MAX_PAGES; i++) {
    const page = await api(`/v1/vms/${encodeURIComponent(vmId)}/timeline${query({ after_seq: after, limit: 1000 })}`, { signal });
    items = items.concat(page.items);
    windows = page.rollback_windows;
    if (page.next_after_seq === null) return { items, windows, truncated: false };
    after = page.next_after_seq;
  }
  return { items, windows, truncated: true };
}

function describe(item) {
  if (item.event) return item.event.type;
  if (item.decision) return `${item.kind} ${item.decision} (${item.reason})`;
  return item.kind;
}

async function renderTimeline(main, vmId, ctx) {
  const picture = h("div", { class: "timeline-box", id: "timeline" });
  const body = h("tbody", { id: "timeline-rows" });
  const note = h("p", { class: "muted" });
  main.append(h("p", {}, h("a", { href: "#/vms" }, "← VMs")),
    h("h1", {}, "Timeline of ", h("span", { class: "ident", id: "vm-name" }, vmId)),
    picture, legend(), note,
    h("h3", {}, "Entries in ledger order"),
    table(["seq", "time", "what", "subject", "alerts"], body, { class: "entries" }));

  // Each alert on this VM reads the timeline again; a read that lands after a later one
  // started is older than it (from before the alert) and is dropped, not drawn over it.
  let reads = 0;
  const paint = async () => {
    const mine = ++reads;
    const [{ items, windows, truncated }, alertPage] = await Promise.all([
      loadTimeline(vmId, ctx.signal), api(`/v1/alerts${query({ vm_id: vmId, limit: 200 })}`, { signal: ctx.signal })]);
    if (mine !== reads) return;
    clear(picture).append(draw(items, windows, alertPage.items));
    note.textContent = `${items.length} entries, ${windows.length} rollback window(s)` +
      (truncated ? " (the oldest entries only: the VM has more)" : "") + ".";
    clear(body).append(...items.map((item) => h("tr", { class: item.event ? "ev-row" : "" },
      h("td", { class: "num" }, item.seq), h("td", { class: "time" }, when(item.time)),
      h("td", {}, describe(item)), h("td", { class: "ident" }, item.subject ?? (item.event ? item.event.event_id : "")),
      h("td", {}, item.alert_ids.map((id) => [link(id, "alerts", id), " "])))));
  };
  let pending = null;
  const stop = ctx.onAlert((alert) => {
    if (alert.vm_id !== vmId || pending) return;
    pending = setTimeout(() => { pending = null; paint().catch(() => {}); }, 300);
  });
  await paint();
  return () => { stop(); if (pending) clearTimeout(pending); };
}
