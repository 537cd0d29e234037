// The ledger: whether its hash chain verifies, its head, the last signed checkpoint, its
// continuity with the witnesses that hold its progress, and the sinks' backlogs.

import { aborted, api } from "./api.js";
import { badge, clear, errorBox, h, table, when } from "./dom.js";

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value ?? "—")]));
}

// The number of the latest verification asked for: an earlier one that answers later is dropped.
let verifications = 0;

/** Verifies the whole chain into `box`; `again` (the button asking for it) is disabled until
 *  the answer, so a second click does not make the service verify everything twice. Leaving
 *  the page (`signal`) aborts it, and the service stops verifying for nobody. */
async function verify(box, again, signal) {
  const mine = ++verifications;
  again.disabled = true;
  clear(box).append(h("p", { class: "muted" }, "Verifying the whole chain…"));
  try {
    const report = await api("/v1/ledger/verify", { signal });
    if (mine !== verifications) return;
    clear(box).append(facts([
      ["chain", badge(report.ok ? "verified" : "NOT verified", report.ok ? "ok" : "bad")],
      ["entries checked", String(report.checked)],
      ["head seq", String(report.head?.seq ?? "—")],
      ["head hash", h("span", { class: "digest" }, report.head?.hash ?? "—")],
      ...(report.ok ? [] : [["problem", report.problem ?? "?"], ["first bad seq", String(report.first_bad_seq ?? "?")]]),
    ]));
    box.dataset.ok = String(report.ok);
  } catch (error) {
    if (mine === verifications && !aborted(error)) clear(box).append(errorBox(error));
  } finally {
    again.disabled = false;
  }
}

export async function render(main, _params, ctx) {
  const verifyBox = h("div", { id: "verify" });
  const again = h("button", { type: "button", id: "verify-again" }, "Verify again");
  again.addEventListener("click", () => verify(verifyBox, again, ctx.signal));
  const status = await api("/v1/status", { signal: ctx.signal });
  const cp = status.ledger.last_checkpoint;
  const sinkRows = status.sinks.map((sink) => h("tr", {},
    h("td", { class: "ident" }, sink.name), h("td", { class: "num" }, sink.backlog),
    h("td", { class: "num" }, sink.delivered), h("td", { class: "num" }, sink.failed_attempts),
    h("td", {}, sink.last_error ?? "")));
  const witnesses = Array.isArray(status.witnesses) ? status.witnesses : null;
  const continuity = status.continuity ?? "unknown";
  main.append(
    h("h1", {}, "Ledger"),
    h("h3", {}, "Verification"), verifyBox, again,
    h("h3", {}, "Head"),
    facts([["seq", String(status.ledger.head.seq)], ["hash", h("span", { class: "digest" }, status.ledger.head.hash)]]),
    h("h3", {}, "Last signed checkpoint"),
    cp ? facts([["seq", String(cp.seq)], ["signed at", when(cp.created_at)], ["hash", h("span", { class: "digest" }, cp.hash)],
                ["key id", cp.key_id], ["algorithm", cp.algorithm]])
       : h("p", { class: "muted" }, "No checkpoint signed yet."),
    h("h3", {}, "Continuity and witnesses"),
    facts([["continuity", badge(continuity, continuity === "ok" ? "ok" : "bad")],
           ...(status.rollback ? [["rollback", `${status.rollback.source}: ${status.rollback.verdict} ` +
             `(holds entry ${status.rollback.held?.seq}, ledger ends at ${status.rollback.head_seq})`]] : [])]),
    witnesses && witnesses.length ? table(["witness", "state", "holds checkpoint of entry", "verdict"],
      witnesses.map((w) => h("tr", { dataset: { witness: w.name } },
        h("td", { class: "ident" }, w.name), h("td", {}, badge(w.state, w.state === "up" ? "ok" : "bad")),
        h("td", { class: "num" }, w.held_seq ?? "—"), h("td", {}, w.verdict ?? "—"))), { id: "witnesses" })
      : h("p", { class: "muted", id: "witnesses" }, witnesses ? "No witnesses configured (setting witnesses)."
          : "This service does not report witnesses."),
    h("h3", {}, `Sinks (reported by ${status.leader ? "this instance, which feeds them" : "an instance that is not feeding them now"})`),
    sinkRows.length ? table(["sink", "backlog", "delivered", "failed attempts", "last error"], sinkRows)
      : h("p", { class: "muted" }, "No sinks configured."));
  await verify(verifyBox, again, ctx.signal);
  return null;
}
