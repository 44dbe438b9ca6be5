/* iortd dashboard: a physicist's electronic sign-off of a delivery (issue 19, item 4;
 * docs/dashboard.md, "Signing off a delivery").
 *
 * Shown on a room's page to a logged-in physicist only, once the room's last delivery has
 * ended and the daemon has published what a sign-off of it signs (`delivery.record` on the
 * retained `delivery` topic: its entries' range and hash and the covering checkpoint).
 * The physicist chooses the meaning (and, for an approval with deviation, the reason) and
 * types the password again; at the first signing of the page's session also the user ID.
 * The server (dashboard/signoff.py) checks the password again, signs with the session's key,
 * publishes to the room's cmd/signoff and answers with the daemon's own notice: the panel
 * says RECORDED only when the daemon said so, and NOT RECORDED otherwise, with why.
 * Everything is written with textContent; the password field is cleared after each try.
 */
"use strict";

(function () {
  const MEANINGS = [
    ["approved", "Approved"],
    ["reviewed", "Reviewed"],
    ["approved_with_deviation", "Approved with deviation (reason required)"],
  ];
  let idGiven = false;  // the ID was given at a signing of this page's session

  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") n.textContent = v; else n.setAttribute(k, v);
    }
    n.append(...kids);
    return n;
  }

  function build() {
    const p = { delivery: null };
    p.root = el("section", { class: "panel signoff", id: "signoff", "aria-labelledby": "h-signoff", hidden: "" });
    p.what = el("p", { id: "signoff-what" });
    p.open = el("button", { type: "button", id: "signoff-open", text: "Sign off" });
    p.meaning = el("select", { id: "signoff-meaning", name: "meaning" },
      ...MEANINGS.map(([v, t]) => el("option", { value: v, text: t })));
    p.reason = el("input", { id: "signoff-reason", name: "reason", maxlength: "500" });
    p.reasonRow = el("div", { class: "signoff-row", hidden: "" },
      el("label", { for: "signoff-reason", text: "Reason" }), p.reason);
    p.holder = el("input", { id: "signoff-holder", name: "holder", autocomplete: "username", maxlength: "64" });
    p.holderRow = el("div", { class: "signoff-row" },
      el("label", { for: "signoff-holder", text: "ID" }), p.holder);
    p.password = el("input", { id: "signoff-password", name: "password", type: "password", autocomplete: "current-password", maxlength: "256" });
    p.submit = el("button", { type: "submit", id: "signoff-submit", text: "Sign with my key" });
    p.form = el("form", { id: "signoff-form", class: "signoff-form", hidden: "" },
      el("div", { class: "signoff-row" }, el("label", { for: "signoff-meaning", text: "Meaning" }), p.meaning),
      p.reasonRow, p.holderRow,
      el("div", { class: "signoff-row" }, el("label", { for: "signoff-password", text: "Password" }), p.password),
      p.submit);
    p.result = el("p", { id: "signoff-result", class: "signoff-result", role: "status", "aria-live": "polite" });
    p.root.append(el("h2", { id: "h-signoff", text: "Sign-off" }), p.what, p.open, p.form, p.result);
    p.open.addEventListener("click", () => {
      p.form.hidden = !p.form.hidden;
      p.holderRow.hidden = idGiven;
      if (!p.form.hidden) (idGiven ? p.password : p.holder).focus();
    });
    p.meaning.addEventListener("change", () => { p.reasonRow.hidden = p.meaning.value !== "approved_with_deviation"; });
    p.form.addEventListener("submit", (ev) => { ev.preventDefault(); send(p); });
    return p;
  }

  function session() {
    const s = window.iortSession ? window.iortSession() : null;
    return s && s.session ? s.session : null;
  }

  async function send(p) {
    const s = session();
    if (!s || !p.delivery) return;
    const fields = { room: p.key, delivery_id: p.delivery, meaning: p.meaning.value, password: p.password.value };
    if (p.meaning.value === "approved_with_deviation") fields.reason = p.reason.value;
    if (!p.holderRow.hidden) fields.holder = p.holder.value.trim();
    p.password.value = "";
    p.submit.disabled = true;
    p.result.textContent = "signing…";
    p.result.dataset.outcome = "pending";
    try {
      const r = await fetch("/api/signoff", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/x-www-form-urlencoded", "x-csrf-token": s.csrf },
        body: new URLSearchParams(fields).toString(),
      });
      const body = await r.json().catch(() => ({}));
      if (body.needs_id) { idGiven = false; p.holderRow.hidden = false; }
      if (r.ok && body.recorded) {
        idGiven = true;
        p.form.hidden = true;
        p.result.dataset.outcome = "recorded";
        p.result.textContent = "RECORDED — " + body.message;
      } else {
        if (![400, 401, 403, 429].includes(r.status) && fields.holder) idGiven = true;
        p.result.dataset.outcome = "not-recorded";
        p.result.textContent = "NOT RECORDED — " + (body.message || body.error || ("HTTP " + r.status));
        if (r.status === 401 && /session has ended/.test(body.error || "")) location.reload();
      }
    } catch (err) {
      p.result.dataset.outcome = "not-recorded";
      p.result.textContent = "NOT RECORDED — the dashboard did not answer";
    } finally {
      p.submit.disabled = false;
    }
  }

  // d: the room's retained delivery (or null); key: "site/room"
  function render(p, key, d) {
    const s = session();
    const ok = !!(s && s.roles.includes("physicist") && d && d.phase === "TERMINATED" && d.record);
    p.root.hidden = !ok;
    if (!ok) return;
    if (p.delivery !== d.delivery_id) {
      p.delivery = d.delivery_id;
      p.result.textContent = "";
      p.form.hidden = true;
    }
    p.key = key;
    const r = d.record;
    p.what.textContent = "Delivery " + d.delivery_id + " has ended. A sign-off signs its record: entries seq "
      + r.first_seq + "–" + r.last_seq + ", covered by the signed checkpoint of size " + r.checkpoint.size + ".";
  }

  window.IortSignoff = { build, render };
})();
