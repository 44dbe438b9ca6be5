/* iortd dashboard: acknowledging an alarm from the room's alarm list (issue 19, item 3;
 * docs/dashboard.md, "Acknowledging an alarm").
 *
 * In each row of the list (app.js, from the retained alarms topic) that nobody has
 * acknowledged, a session with the operator or physicist role gets an "Acknowledge" button
 * in the row's .alarm-actions place; viewers and anonymous room displays get none (and the
 * server refuses their POST anyway: the role table, dashboard/login.py). The button opens a
 * small form: an optional comment (at most 200 characters, one line: staff remarks, never
 * patient data) and "Confirm acknowledgement". No password: an acknowledgement says that a
 * person saw the alarm, it is not a signature of meaning; the server signs it with the key
 * the session unlocked at login (dashboard/ack.py).
 *
 * The result is the daemon's own word, shown in the row and in the panel's status line
 * (announced to a screen reader; it stays when the row leaves the list, as a cleared alarm
 * does once acknowledged):
 * ACKNOWLEDGED only when the daemon said "acknowledged by"; NOT ACKNOWLEDGED with the
 * daemon's refusal or the dashboard's reason (nothing sent); NOT RECORDED when the daemon
 * did not answer. The row's "acknowledged by NAME (holder) at T" comes from the retained
 * topic, never from this script. Everything is written with textContent.
 */
"use strict";

(function () {
  const ACTING = ["operator", "physicist"];

  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") n.textContent = v; else n.setAttribute(k, v);
    }
    n.append(...kids);
    return n;
  }

  function session() {
    const s = window.iortSession ? window.iortSession() : null;
    return s && s.session ? s.session : null;
  }

  // Who may act here: "" for nobody (a redraw of the list is due when this changes).
  function who() {
    const s = session();
    return s && s.roles.some((r) => ACTING.includes(r)) ? s.holder : "";
  }

  let seq = 0;

  function build(r, status) {
    const n = ++seq;
    const u = { status, pending: false };
    u.open = el("button", { type: "button", class: "alarm-ack-open", text: "Acknowledge", "aria-expanded": "false" });
    u.comment = el("input", { class: "alarm-ack-comment", id: "alarm-ack-comment-" + n, name: "comment", maxlength: "200", autocomplete: "off" });
    u.submit = el("button", { type: "submit", class: "alarm-ack-submit", text: "Confirm acknowledgement" });
    u.cancel = el("button", { type: "button", class: "alarm-ack-cancel", text: "Cancel" });
    u.form = el("form", { class: "alarm-ack-form", hidden: "" },
      el("label", { for: u.comment.id, text: "Comment (optional)" }), u.comment, u.submit, u.cancel);
    u.result = el("span", { class: "alarm-ack-result" });  // seen in the row; announced by the panel's line
    u.open.addEventListener("click", () => toggle(u, u.form.hidden));
    u.cancel.addEventListener("click", () => { toggle(u, false); u.open.focus(); });
    u.form.addEventListener("keydown", (ev) => { if (ev.key === "Escape") { toggle(u, false); u.open.focus(); } });
    u.form.addEventListener("submit", (ev) => { ev.preventDefault(); send(u); });
    r.actions.append(u.open, u.form, u.result);
    return u;
  }

  function toggle(u, on) {
    u.form.hidden = !on;
    u.open.setAttribute("aria-expanded", String(on));
    if (on) u.comment.focus();
  }

  function say(u, outcome, text) {
    u.result.dataset.outcome = outcome;
    u.result.textContent = text;
    if (u.status) { u.status.dataset.outcome = outcome; u.status.textContent = "Last acknowledgement from this page: " + text; }
  }

  // The daemon's notice ends with the command's nonce, which says nothing to a person.
  const plain = (m) => String(m || "").replace(/ \[(nonce|sha256) [^\]]*\]$/, "");

  async function send(u) {
    const s = session();
    if (!s || u.pending || !u.row) return;
    const row = u.row;
    const fields = { room: u.room, alarm_key: row.key, raised_at: row.raised_at, delivery_id: row.delivery_id || "" };
    const comment = u.comment.value.trim();
    if (comment) fields.comment = comment;
    u.pending = true;
    u.submit.disabled = true;
    u.open.disabled = true;
    say(u, "pending", "sending the acknowledgement of " + row.key + "…");
    try {
      const r = await fetch("/api/ack", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/x-www-form-urlencoded", "x-csrf-token": s.csrf },
        body: new URLSearchParams(fields).toString(),
      });
      const body = await r.json().catch(() => ({}));
      if (r.ok && body.recorded) {
        toggle(u, false);
        u.comment.value = "";
        say(u, "recorded", "ACKNOWLEDGED — " + plain(body.message));
      } else if (r.status === 504) {
        say(u, "not-recorded", body.error || "NOT recorded: no answer from the room's daemon");
      } else if (r.status === 422) {
        say(u, "refused", "NOT ACKNOWLEDGED — the daemon refused: " + plain(body.message));
      } else {
        say(u, "refused", "NOT ACKNOWLEDGED — " + (body.error || ("HTTP " + r.status)));
        if (r.status === 401) location.reload();  // the session ended: log in again
      }
    } catch (err) {
      say(u, "not-recorded", "NOT recorded — the dashboard did not answer");
    } finally {
      u.pending = false;
      u.submit.disabled = false;
      u.open.disabled = false;
    }
  }

  // r: the row's elements (app.js, buildAlarmRow); row: the server's row; room: "site/room";
  // status: the panel's status line.
  function render(r, row, room, status) {
    const may = who() !== "" && !row.acknowledged;
    if (!r.ackUi) {
      if (!may) return;
      r.ackUi = build(r, status);
    }
    const u = r.ackUi;
    u.row = row;
    u.room = room;
    u.open.hidden = !may;
    if (!may) { u.form.hidden = true; u.open.setAttribute("aria-expanded", "false"); }
  }

  window.IortAck = { render, who };
})();
