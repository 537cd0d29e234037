// Principals (admin): failures, lockout and tokens of each, and the unlock (with a note,
// written to the ledger).

import { api, query } from "./api.js";
import { badge, clear, errorBox, h, table, when } from "./dom.js";

function tokens(list) {
  if (!list.length) return h("span", { class: "muted" }, "none");
  return h("ul", { class: "tokens" }, list.map((t) => h("li", {},
    h("span", { class: "ident" }, t.token_id), ` ${t.type} `, badge(t.state, "token"))));
}

function unlockCell(p, reload) {
  const note = h("input", { type: "text", class: "unlock-note", placeholder: "note", maxlength: 2000,
                            "aria-label": "unlock note" });
  const button = h("button", { type: "button", class: "unlock" }, p.locked ? "Unlock" : "Reset failures");
  const message = h("span");
  button.disabled = !p.locked && p.failures === 0;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await api(`/v1/principals/${encodeURIComponent(p.principal)}/unlock`, { method: "POST", body: { note: note.value || null } });
      await reload();
    } catch (error) {
      clear(message).append(errorBox(error));
      button.disabled = false;
    }
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
  let cursor = null;
  const row = (p, reload) => h("tr", { dataset: { principal: p.principal }, class: p.locked ? "locked" : "" },
    h("td", { class: "ident" }, p.principal),
    h("td", {}, p.locked ? badge("locked", "bad") : "no"),
    h("td", { class: "time" }, p.locked ? when(p.locked_until) : ""),
    h("td", { class: "num" }, p.failures),
    h("td", {}, tokens(p.tokens)),
    unlockCell(p, reload));
  const reload = async () => {
    cursor = null;
    clear(body);
    await load();
  };
  const load = async () => {
    const page = await api(`/v1/principals${query({ limit: 200, cursor })}`);
    body.append(...page.items.map((p) => row(p, reload)));
    cursor = page.next_cursor;
    more.hidden = cursor === null;
  };
  more.addEventListener("click", () => load().catch((error) => main.append(errorBox(error))));
  main.append(h("h1", {}, "Principals"),
    table(["principal", "locked", "until", "failures", "tokens", "unlock (ledgered)"], body, { class: "principals" }), more);
  await load();
  return null;
}
