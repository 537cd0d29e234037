// Principals (admin): failures, lockout and tokens of each, and the unlock (with a note,
// written to the ledger).

import { aborted, api, query } from "./api.js";
import { badge, clear, errorBox, h, table, when } from "./dom.js";

function tokens(list) {
  if (!list.length) return h("span", { class: "muted" }, "none");
  return h("ul", { class: "tokens" }, list.map((t) => h("li", {},
    h("span", { class: "ident" }, t.token_id), ` ${t.type} `, badge(t.state, "token"))));
}

/** The unlock cell of `p`'s row: `unlocked(state)` gets the principal's state the unlock left. */
function unlockCell(p, unlocked) {
  const note = h("input", { type: "text", class: "unlock-note", placeholder: "note", maxlength: 2000,
                            "aria-label": "unlock note" });
  const button = h("button", { type: "button", class: "unlock" }, p.locked ? "Unlock" : "Reset failures");
  const message = h("span");
  button.disabled = !p.locked && p.failures === 0;
  button.addEventListener("click", async () => {
    button.disabled = true;  // until it answers: a second click would be a second ledgered unlock
    let done;
    try {
      done = await api(`/v1/principals/${encodeURIComponent(p.principal)}/unlock`, { method: "POST", body: { note: note.value || null } });
    } catch (error) {
      clear(message).append(errorBox(error));
      button.disabled = false;
      return;
    }
    unlocked({ ...p, locked: done.locked, failures: done.failures ?? 0, locked_until: done.locked ? p.locked_until : null });
  });
  return h("td", { class: "unlock-cell" }, note, button, message);
}

export async function render(main, _params, ctx) {
  if (!ctx.isAdmin()) {
    main.append(h("h1", {}, "Principals"), h("p", { class: "muted" }, "Only an admin token may list principals."));
    return null;
  }
  const body = h("tbody", { id: "principal-rows" });
  const more = h("button", { type: "button", id: "more", hidden: true }, "More principals");
  const listError = h("div");
  let cursor = null;
  let loading = false;
  // Each listed principal's row and when the console learned the state it shows, on a clock of
  // the page's own: a page counts from when it was asked for, an unlock from when it answered.
  // A page asked for before an unlock answered may have been read before the unlock, so the
  // unlock's result stays; a page asked for after it is newer and replaces it. A principal is
  // listed once: a page naming one already listed updates its row in place.
  let clock = 0;
  const listed = new Map();
  const show = (p, at) => {
    const mine = listed.get(p.principal);
    if (mine !== undefined && mine.at > at) return;
    const tr = h("tr", { dataset: { principal: p.principal }, class: p.locked ? "locked" : "" },
      h("td", { class: "ident" }, p.principal),
      h("td", {}, p.locked ? badge("locked", "bad") : "no"),
      h("td", { class: "time" }, p.locked ? when(p.locked_until) : ""),
      h("td", { class: "num" }, p.failures),
      h("td", {}, tokens(p.tokens)),
      unlockCell(p, (state) => show(state, ++clock)));
    if (mine !== undefined) mine.tr.replaceWith(tr);
    else body.append(tr);
    listed.set(p.principal, { at, tr });
  };
  // One page at a time (the button is disabled meanwhile): the next page is asked for once.
  const load = async () => {
    if (loading) return;
    loading = true;
    more.disabled = true;
    body.setAttribute("aria-busy", "true");
    const asked = ++clock;
    try {
      const page = await api(`/v1/principals${query({ limit: 200, cursor })}`, { signal: ctx.signal });
      for (const p of page.items) show(p, asked);
      cursor = page.next_cursor;
      more.hidden = cursor === null;
    } finally {
      loading = false;
      more.disabled = false;
      body.setAttribute("aria-busy", "false");
    }
  };
  more.addEventListener("click", () => {
    clear(listError);
    load().catch((error) => { if (!aborted(error)) listError.append(errorBox(error)); });
  });
  main.append(h("h1", {}, "Principals"),
    table(["principal", "locked", "until", "failures", "tokens", "unlock (ledgered)"], body, { class: "principals" }),
    listError, more);
  await load();
  return null;
}
