/* iortd dashboard: the verification panel (issue 18, item 3).
 *
 * The daemon checks the console against the room's prescription when the console is
 * ready (plan selected, before beam-on) and publishes the latest check of the current
 * delivery as `delivery.verification` on the retained `delivery` topic (schema:
 * docs/schemas/v1/delivery.schema.json, $defs.verification). This file turns that object
 * into words: LARGE before beam-on (phase PREPARATORY or READY), compact during and after
 * it. The outcome is always a word as well as a colour (IEC 60601-1-8, WCAG 1.4.1: never
 * colour alone): VERIFIED, NOT VERIFIED (with one plain line per failed item),
 * VERIFIED WITH OVERRIDE (with the overridden items), and NOT CHECKED (null: no check
 * yet, or verification off at the site; neutral, because the daemon raises the alarms
 * and the alarm list shows them).
 *
 * The object has passed the published schema and the server's consistency check
 * (dashboard/room.py, verification_error) before it gets here; everything is written
 * with textContent. `view()` is pure (no DOM), `build()` makes one panel's nodes and
 * `render()` fills them. The words of each item are docs/dashboard.md's table, and a
 * unit test keeps ITEM_LINES, OUTCOMES and TRIGGERS equal to the contract's vocabulary.
 */
"use strict";

(function () {
  const OUTCOMES = {
    VERIFIED: { word: "VERIFIED", tone: "ok", icon: "ok" },
    NOT_VERIFIED: { word: "NOT VERIFIED", tone: "bad", icon: "tripped" },
    VERIFIED_OVR: { word: "VERIFIED WITH OVERRIDE", tone: "warn", icon: "fault" },
    NOT_CHECKED: { word: "NOT CHECKED", tone: "neutral", icon: "unknown" },
  };

  const TRIGGERS = {
    ready: "when the console became ready",
    beam_on: "at beam-on: no check was made before it",
    prescription: "when a prescription or output factor arrived",
    override: "after a physicist's signed override",
    joined: "when the daemon joined this delivery in progress",
  };

  function gy(x) {
    if (x === null || x === undefined) return "—";
    if (typeof x === "string") return x.toUpperCase();  // "nan", "inf": said, never hidden
    return x.toFixed(2) + " Gy";
  }
  function minSec(s) {
    if (s === null || s === undefined) return "—";
    if (typeof s === "string") return s.toUpperCase();
    let t = Math.round(Math.abs(s));
    const h = Math.floor(t / 3600); t -= h * 3600;
    const m = Math.floor(t / 60); const sec = t - m * 60;
    const mm = (h > 0 ? String(m).padStart(2, "0") : String(m)) + ":" + String(sec).padStart(2, "0");
    return (s < 0 ? "-" : "") + (h > 0 ? h + ":" + mm : mm);
  }
  function applicator(a) {
    if (!a) return "none reported";
    const dia = typeof a.diameter_mm === "number" ? a.diameter_mm + " mm" : String(a.diameter_mm).toUpperCase();
    return a.type + " " + dia + (a.serial ? " (s/n " + a.serial + ")" : "");
  }
  function code(v) { return v.applicator_code === null ? "—" : v.applicator_code; }
  function diffPct(planned, expected) {
    if (typeof planned !== "number" || typeof expected !== "number" || expected === 0) return "";
    const p = ((planned - expected) / expected) * 100;
    return " (" + (p >= 0 ? "+" : "") + p.toFixed(1) + " %)";
  }

  // One plain line per item (docs/dashboard.md, "Verification before beam-on"); v is the
  // verification object, d the delivery it belongs to, reader the reader's latest message.
  const ITEM_LINES = {
    no_prescription: () => "no prescription: none is pending for this room",
    signature: (v) => "signature: the approving physicist's key is not enrolled, not valid now, or not a physicist's" +
      (v.treatment_id ? " (treatment " + v.treatment_id + ")" : ""),
    expired: () => "expired: the prescription is past its validity; approve a new one",
    already_delivered: (v) => "already delivered: a delivery was already given under this prescription" +
      (v.plan_id ? " (plan " + v.plan_id + ")" : ""),
    applicator: (v, d) => "applicator: console " + applicator(d.applicator) + ", prescribed " + code(v),
    applicator_reader: (v, d, reader) => "applicator at the reader: reader " +
      (reader ? applicator(reader.applicator) + " now" : "no reading held") + ", prescribed " + code(v),
    dose: (v) => "dose: console preset " + gy(v.preset_gy) + ", prescribed " + gy(v.prescribed_dose_gy),
    time: (v) => "time: console planned " + minSec(v.planned_time_s) + ", expected " + minSec(v.expected_time_s) +
      " from the dose-rate table" + diffPct(v.planned_time_s, v.expected_time_s),
    time_unchecked: (v) => "time not checked: no independent time (" +
      (v.planned_time_s === null ? "the console reports no planned time" : "no dose-rate table entry or output factor for today") + ")",
  };

  function itemLine(item, v, d, reader) {
    const f = ITEM_LINES[item];
    return f ? f(v, d, reader) : item + ": (not described by this dashboard version)";
  }

  function clock(ts) {
    const v = typeof ts === "string" ? Date.parse(ts) : NaN;
    return Number.isFinite(v) ? new Date(v).toISOString().slice(11, 19) + " UTC" : "";
  }

  /* After the beam first came on? The latest check governs only if it was made before
     beam-on (the contract); the payload has no beam-on time, but the first beam-on was at
     or before `sent` (the delivery message's ts) less its beam-on time, so a check made
     later than that was made after it. One made at beam-on says so by its trigger. (The
     other way round cannot be told here: an interrupted delivery has more wall time than
     beam-on time; the audit log has the order.) */
  function afterBeamOn(v, d, sent) {
    if (v.trigger === "beam_on") return true;
    const at = Date.parse(v.at), ts = Date.parse(sent);
    if (!Number.isFinite(at) || !Number.isFinite(ts) || typeof d.beam_on_s !== "number" || d.beam_on_s <= 0) return false;
    return at > ts - d.beam_on_s * 1000;
  }

  /* The panel's content for delivery d (or null) in phase `phase`, from a message sent at
     `sent`; reader: the applicator reader's latest message or null. null: no panel. */
  function view(d, phase, reader, sent) {
    if (!d) return null;
    const before = phase === "PREPARATORY" || phase === "READY";
    const size = before ? "large" : "compact";
    if (!("verification" in d) || d.verification === null) {
      return {
        outcome: "NOT_CHECKED", size, ...OUTCOMES.NOT_CHECKED,
        when: "verification" in d ? "no check made for this delivery (or verification is off at this site)"
          : "this daemon does not report verification",
        lines: [], rx: "", time: "", late: "",
      };
    }
    const v = d.verification;
    const o = OUTCOMES[v.outcome] || OUTCOMES.NOT_VERIFIED;  // never green for what is not known
    const lines = [];
    if (v.outcome === "VERIFIED_OVR") {
      for (const item of v.overridden) lines.push({ item, text: "overridden — " + itemLine(item, v, d, reader) });
    } else {
      for (const item of v.reasons) lines.push({ item, text: itemLine(item, v, d, reader) });
    }
    const rx = v.treatment_id === null ? "No prescription" :
      "Treatment " + v.treatment_id + " · plan " + (v.plan_id === null ? "—" : v.plan_id) +
      " · prescribed " + gy(v.prescribed_dose_gy) + " · applicator " + code(v);
    const time = v.expected_time_s === null && v.planned_time_s === null ? "" :
      "Time: planned " + minSec(v.planned_time_s) + " (console), expected " + minSec(v.expected_time_s) + " (independent)";
    return {
      outcome: v.outcome, size, ...o,
      when: "checked " + clock(v.at) + " " + (TRIGGERS[v.trigger] || v.trigger),
      late: v.trigger === "beam_on" ? "made at beam-on: there was no check before the beam came on"
        : afterBeamOn(v, d, sent) ? "made after the beam came on: the check that governed beam-on is in the audit log" : "",
      lines, rx, time,
    };
  }

  function el(tag, cls, id) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (id) e.id = id;
    return e;
  }

  /* The nodes of one panel; `id` names the room page's (null on a card). */
  function build(id) {
    const p = {};
    p.root = el("section", "verif", id);
    p.root.hidden = true;
    p.root.setAttribute("aria-label", "Verification of the console against the prescription");
    p.label = el("h2", "verif-label");
    p.label.textContent = id ? "Verification: console against prescription" : "Verification";
    p.head = el("div", "verif-word");
    if (id) {  // a live region on the room page only: dozens of cards would talk at once
      p.head.setAttribute("role", "status");
      p.head.setAttribute("aria-live", "polite");
    }
    p.icon = el("span");
    p.word = el("span", "verif-text");
    p.head.append(p.icon, p.word);
    p.when = el("div", "verif-when");
    p.late = el("div", "verif-late");
    p.reasons = el("ul", "verif-reasons");
    p.rx = el("div", "verif-rx");
    p.time = el("div", "verif-time");
    p.root.append(p.label, p.head, p.late, p.reasons, p.rx, p.time, p.when);
    return p;
  }

  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }
  function setAttr(node, k, v) { if (node.getAttribute(k) !== v) node.setAttribute(k, v); }

  /* Fill panel p from view w; icons: the page's constant SVG markup, by key. */
  function render(p, w, icons) {
    p.root.hidden = !w;
    if (!w) return;
    setAttr(p.root, "data-outcome", w.outcome);
    setAttr(p.root, "data-tone", w.tone);
    setAttr(p.root, "data-size", w.size);
    if (p.icon.dataset.icon !== w.icon) { p.icon.dataset.icon = w.icon; p.icon.innerHTML = icons[w.icon] || ""; }
    setText(p.word, w.word);
    setText(p.when, w.when);
    setText(p.late, w.late);
    p.late.hidden = !w.late;
    setText(p.rx, w.rx);
    p.rx.hidden = !w.rx;
    setText(p.time, w.time);
    p.time.hidden = !w.time;
    const sig = JSON.stringify(w.lines);
    if (p.sig !== sig) {
      p.sig = sig;
      p.reasons.replaceChildren(...w.lines.map((l) => {
        const li = document.createElement("li");
        li.dataset.item = l.item;
        li.textContent = l.text;
        return li;
      }));
    }
    p.reasons.hidden = w.lines.length === 0;
  }

  window.IortVerification = { view, build, render };
})();
