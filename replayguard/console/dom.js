// Building the page without HTML strings: every value, identifiers above all, goes in as
// a text node (textContent) or an attribute set by name; nothing is ever parsed as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An HTML element: h("td", {class: "x"}, "text", otherNode). */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

/** "2026-11-29 10:05:00Z" from an RFC 3339 string (seconds precision), or "—". */
export function when(iso) {
  if (!iso) return "—";
  return iso.replace("T", " ").replace(/\.\d+Z$/, "Z");
}

/** A link to a page of the console; the identifier is encoded, never interpreted. */
export function link(text, ...parts) {
  return h("a", { href: "#/" + parts.map(encodeURIComponent).join("/") }, text);
}

/** A table in a horizontally scrolling box; `rows` is an array of <tr> or a <tbody> to keep filling. */
export function table(headers, rows, attrs) {
  const body = rows instanceof HTMLTableSectionElement ? rows : h("tbody", {}, rows);
  return h("div", { class: "scroll" }, h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((name) => h("th", {}, name)))), body));
}

export function badge(value, kind) {
  return h("span", { class: `badge ${kind || ""} ${kind ? kind + "-" + String(value).replace(/[^a-z_]/g, "") : ""}` }, value);
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}
