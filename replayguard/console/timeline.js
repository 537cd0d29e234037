// The per-VM timeline, drawn as SVG: one time axis, lanes for hypervisor events,
// decisions and alerts, and the VM's rollback windows shaded across every lane — the
// picture of a snapshot-replay attack: a login, a revert that undoes it, the replay.
// Every label is an SVG <title> or <text> filled through textContent.

import { s } from "./dom.js";

const WIDTH = 1000;
const LEFT = 110;
const RIGHT = 20;
const LANE = 46;
const TOP = 24;
const LANES = ["hypervisor", "decisions", "alerts"];
const LANE_NAMES = { hypervisor: "Hypervisor", decisions: "Decisions", alerts: "Alerts" };

const ms = (iso) => Date.parse(iso);

function lane(item) {
  if (item.event) return "hypervisor";
  if (item.decision) return "decisions";
  return null;
}

function eventShape(type) {
  if (type === "snapshot.created" || type === "snapshot.deleted") return "snapshot";
  if (type === "snapshot.reverted" || type === "vm.restored" || type === "vm.cloned") return "rollback";
  return "lifecycle";
}

/** Marks to draw: {lane, t, cls, label, href?}. */
export function marks(items, alerts) {
  const out = [];
  for (const item of items) {
    const where = lane(item);
    if (where === "hypervisor") {
      const type = item.event.type;
      out.push({ lane: where, t: ms(item.time), cls: `ev ev-${eventShape(type)}`,
                 label: `seq ${item.seq} · ${type} · ${item.event.event_id} · ${item.time}` });
    } else if (where === "decisions") {
      out.push({ lane: where, t: ms(item.time), cls: `dec dec-${item.decision === "accept" ? "accept" : "reject"}`,
                 label: `seq ${item.seq} · ${item.kind} ${item.decision} (${item.reason}) · ${item.subject ?? ""} · ${item.time}` });
    }
  }
  for (const alert of alerts) {
    out.push({ lane: "alerts", t: ms(alert.first_seen), cls: `al al-${alert.severity}`,
               label: `alert ${alert.id} · ${alert.severity} ${alert.kind} · ${alert.principal ?? ""} · ${alert.first_seen}`,
               href: `#/alerts/${encodeURIComponent(alert.id)}` });
  }
  return out.filter((m) => Number.isFinite(m.t));
}

/** The axis bounds covering every mark and window, padded. */
export function bounds(markList, windows) {
  const times = markList.map((m) => m.t);
  for (const w of windows) {
    if (w.start) times.push(ms(w.start));
    times.push(ms(w.end));
  }
  if (!times.length) return null;
  let lo = Math.min(...times);
  let hi = Math.max(...times);
  if (hi - lo < 1000) { lo -= 30000; hi += 30000; }
  const pad = (hi - lo) * 0.06;
  return [lo - pad, hi + pad];
}

function ticks(lo, hi, count) {
  const out = [];
  for (let i = 0; i <= count; i++) out.push(lo + ((hi - lo) * i) / count);
  return out;
}

function tickLabel(t, span) {
  const iso = new Date(t).toISOString();
  return span > 2 * 86400000 ? iso.slice(5, 16).replace("T", " ") : iso.slice(11, 19);
}

function shape(mark, x, y) {
  const title = s("title", { text: mark.label });
  let node;
  if (mark.cls.startsWith("ev")) {
    node = mark.cls.includes("rollback")
      ? s("path", { d: `M${x - 7},${y - 7} L${x + 7},${y - 7} L${x},${y + 7} Z`, class: mark.cls }, title)
      : s("rect", { x: x - 5, y: y - 5, width: 10, height: 10, transform: `rotate(45 ${x} ${y})`, class: mark.cls }, title);
  } else if (mark.cls.startsWith("dec")) {
    node = s("circle", { cx: x, cy: y, r: 6, class: mark.cls }, title);
  } else {
    node = s("path", { d: `M${x},${y - 8} L${x + 8},${y + 6} L${x - 8},${y + 6} Z`, class: mark.cls }, title);
  }
  return mark.href ? s("a", { href: mark.href }, node) : node;
}

/** The whole timeline as an <svg> element. */
export function draw(items, windows, alerts) {
  const markList = marks(items, alerts);
  const range = bounds(markList, windows);
  const height = TOP + LANES.length * LANE + 40;
  const root = s("svg", { viewBox: `0 0 ${WIDTH} ${height}`, class: "timeline", role: "img",
                          "aria-label": "VM timeline" });
  if (!range) {
    root.append(s("text", { x: LEFT, y: TOP + 20, class: "muted", text: "Nothing recorded for this VM yet." }));
    return root;
  }
  const [lo, hi] = range;
  const x = (t) => LEFT + ((t - lo) / (hi - lo)) * (WIDTH - LEFT - RIGHT);
  const laneY = (name) => TOP + LANES.indexOf(name) * LANE + LANE / 2;
  const bottom = TOP + LANES.length * LANE;

  for (const w of windows) {
    const x0 = w.start ? Math.max(LEFT, x(ms(w.start))) : LEFT;
    const x1 = Math.max(x0 + 2, x(ms(w.end)));
    root.append(s("rect", { x: x0, y: TOP - 6, width: x1 - x0, height: bottom - TOP + 12,
                            class: w.start ? "window" : "window window-open" },
      s("title", { text: `rollback window ${w.id} (${w.cause}): ${w.start || "unknown start"} → ${w.end}` })));
    root.append(s("text", { x: x0 + 3, y: TOP - 9, class: "window-label",
                            text: w.start ? "rollback window" : "rollback window (start unknown)" }));
  }
  for (const name of LANES) {
    const y = laneY(name);
    root.append(s("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y, y2: y, class: "lane" }));
    root.append(s("text", { x: 8, y: y + 4, class: "lane-name", text: LANE_NAMES[name] }));
  }
  const span = hi - lo;
  for (const t of ticks(lo, hi, 6)) {
    root.append(s("line", { x1: x(t), x2: x(t), y1: bottom, y2: bottom + 5, class: "tick" }));
    root.append(s("text", { x: x(t), y: bottom + 18, class: "tick-label", "text-anchor": "middle",
                            text: tickLabel(t, span) }));
  }
  for (const mark of markList) root.append(shape(mark, x(mark.t), laneY(mark.lane)));
  return root;
}

export function legend() {
  const entries = [["ev ev-snapshot", "snapshot"], ["ev ev-rollback", "revert / restore / clone"],
                   ["dec dec-accept", "accepted"], ["dec dec-reject", "refused"],
                   ["al al-critical", "critical alert"], ["al al-warning", "warning alert"], ["window", "rollback window"]];
  const root = s("svg", { viewBox: `0 0 ${WIDTH} 22`, class: "legend" });
  let at = 8;
  for (const [cls, name] of entries) {
    const mark = cls === "window" ? s("rect", { x: at, y: 4, width: 14, height: 14, class: cls })
      : cls.startsWith("dec") ? s("circle", { cx: at + 7, cy: 11, r: 6, class: cls })
      : cls.includes("rollback") ? s("path", { d: `M${at},${4} L${at + 14},${4} L${at + 7},${18} Z`, class: cls })
      : cls.startsWith("al") ? s("path", { d: `M${at + 7},${3} L${at + 15},${17} L${at - 1},${17} Z`, class: cls })
      : s("rect", { x: at + 2, y: 6, width: 10, height: 10, transform: `rotate(45 ${at + 7} 11)`, class: cls });
    root.append(mark, s("text", { x: at + 20, y: 15, class: "legend-text", text: name }));
    at += 30 + name.length * 7;
  }
  return root;
}
