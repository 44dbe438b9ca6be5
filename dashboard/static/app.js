/* iortd dashboard: the browser side.
 *
 * One EventSource to the dashboard server (/events, or /events?room=SITE/ROOM on a room
 * page). The first event is a snapshot of what the server holds (built from MQTT only);
 * then one "msg" per MQTT message, "broker" when the server's MQTT link changes, "tick"
 * every second. Staleness is computed here, with this browser's clock, from when each
 * message arrived, so that a dead server, a dead stream or a dead daemon all end in the
 * same visible state: greyed values, the word STALE or OFFLINE, and the age of the last
 * message. No request goes anywhere but this page's own origin.
 *
 * Hostile input (issue 13): the server validates every payload against the published
 * schemas, so only valid messages arrive here; still, each room card and each section of
 * a room page is drawn in isolation (try/catch): a room whose data cannot be drawn shows
 * DISPLAY ERROR on its own card and every other room goes on updating. Liveness derives
 * only from messages the server accepted. The overview lists sites and pages rooms
 * (?site=SITE&page=N); a room with nothing valid for the age-out bound is AGED OUT, and
 * the server's "removed" takes it off.
 */
"use strict";

(function () {
  const RETAINED = ["status", "interlocks", "delivery", "audit/checkpoint"];
  const MAX_ROOMS = 2000;  // rooms the overview holds (the server's snapshot gives <= 1000)
  const INTERLOCK_NAMES = {
    door: "Door",
    emergency_stop: "Emergency stop",
    applicator: "Applicator",
    kv: "Tube voltage (kV)",
    ua: "Tube current (µA)",
    cooling: "Cooling",
    dose_channels: "Dose channels agree",
    dose_rate: "Dose rate",
    backup_timer: "Backup timer",
    communication: "Communication",
  };
  const ICONS = {
    on: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="2.6" fill="currentColor"/><path fill="currentColor" d="M12 9.1 7.2 1.9a11 11 0 0 1 9.6 0zM14.5 13.45l8.6.6a11 11 0 0 1-4.8 8.3zM9.5 13.45l-3.8 8.9a11 11 0 0 1-4.8-8.3z"/></svg>',
    off: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="9.5" fill="none" stroke="currentColor" stroke-width="2.5"/><rect x="7" y="10.5" width="10" height="3" fill="currentColor"/></svg>',
    ready: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="9.5" fill="none" stroke="currentColor" stroke-width="2.5"/><path d="M12 6v6l4 3" fill="none" stroke="currentColor" stroke-width="2.5"/></svg>',
    interrupted: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="9.5" fill="none" stroke="currentColor" stroke-width="2.5"/><rect x="8" y="7" width="3" height="10" fill="currentColor"/><rect x="13" y="7" width="3" height="10" fill="currentColor"/></svg>',
    fault: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 2 23 21H1z" fill="none" stroke="currentColor" stroke-width="2.5" stroke-linejoin="round"/><rect x="10.8" y="8" width="2.4" height="7" fill="currentColor"/><rect x="10.8" y="16.5" width="2.4" height="2.4" fill="currentColor"/></svg>',
    unknown: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="9.5" fill="none" stroke="currentColor" stroke-width="2.5"/><path d="M9 9.2a3 3 0 1 1 4.2 2.8c-.8.4-1.2 1-1.2 1.9v.6" fill="none" stroke="currentColor" stroke-width="2.4"/><rect x="10.8" y="16" width="2.4" height="2.4" fill="currentColor"/></svg>',
    ok: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 12.5l5 5L20 6.5" fill="none" stroke="currentColor" stroke-width="3.2"/></svg>',
    tripped: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M5 5l14 14M19 5 5 19" fill="none" stroke="currentColor" stroke-width="3.2"/></svg>',
    stale: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="9.5" fill="none" stroke="currentColor" stroke-width="2.5"/><path d="M12 6v6.5H7" fill="none" stroke="currentColor" stroke-width="2.5"/><path d="M3 21 21 3" stroke="currentColor" stroke-width="2.5"/></svg>',
    sim: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="3" y="5" width="18" height="12" fill="none" stroke="currentColor" stroke-width="2.5"/><path d="M8 21h8M12 17v4" stroke="currentColor" stroke-width="2.5"/></svg>',
  };

  // ---- the model: the server's snapshot, then every message applied in order ----------
  const model = {
    config: { stale_after_s: 5, history_points: 4000, tick_s: 1, age_out_s: 86400, page_size: 48 },
    only: null,
    site: null,
    sites: {},
    links: {},  // site -> { up, since_ms, seen_ms }: its bridge to the central broker
    diagnostics: null,
    rooms: new Map(),
    omitted: 0,
    broker: { connected: false, reason: "not connected yet", url: "" },
    streamOpen: false,
    lastServerEvent: -Infinity,
  };

  function newRoom(key, site, room) {
    return {
      key, site, room,
      retained: {},
      telemetry: null,
      historyDelivery: null,
      history: [],
      applicator: null,
      aplTraceDelivery: null,
      aplTrace: [],
      events: [],
      rejected: {},
      rejectedTotal: 0,
      eventsDropped: 0,
      lastValid: null,
      dirty: true,
    };
  }

  function held(x, now) {
    return { payload: x.payload, rx: now - x.age_ms };
  }

  function loadSnapshot(data) {
    const now = performance.now();
    model.config = data.config;
    model.only = data.only || null;
    model.site = data.site || null;
    model.sites = data.sites || {};
    model.links = data.links || {};
    model.diagnostics = data.diagnostics || null;
    model.omitted = data.rooms_omitted || 0;
    model.broker = data.broker;
    model.rooms = new Map();
    for (const [key, r] of Object.entries(data.rooms)) {
      // One room's snapshot that cannot be read is left out; the others load.
      try {
        const room = newRoom(key, r.site, r.room);
        for (const [name, h] of Object.entries(r.retained)) room.retained[name] = held(h, now);
        room.telemetry = r.telemetry ? held(r.telemetry, now) : null;
        room.historyDelivery = r.history_delivery || null;
        room.history = r.history || [];  // the overview's snapshot has no plots
        room.applicator = r.applicator ? held(r.applicator, now) : null;
        room.aplTraceDelivery = r.applicator_trace_delivery || null;
        room.aplTrace = r.applicator_trace || [];
        room.events = (r.events || []).map((e) => held(e, now));
        room.rejected = r.rejected || {};
        room.rejectedTotal = Object.values(room.rejected).reduce((a, b) => a + b, 0);
        room.eventsDropped = r.events_dropped || 0;
        room.notices = r.notices || {};
        loadAlarms(room, r, now);
        room.lastValid = typeof r.last_valid_age_ms === "number" ? now - r.last_valid_age_ms : now;
        model.rooms.set(key, room);
      } catch (err) {
        console.warn("room " + key + " left out of the snapshot: " + err);
      }
    }
    structureChanged = true;
  }

  function epochMs(ts) {
    if (typeof ts !== "string") return null;
    const v = Date.parse(ts);
    return Number.isFinite(v) ? v : null;
  }

  function num(x) {
    return typeof x === "number" && Number.isFinite(x) ? x : null;
  }

  function pointOf(p) {
    const t = epochMs(p.at);
    if (p.delivery_id === null || p.delivery_id === undefined || t === null) return null;
    return {
      t, d1: num(p.dose_primary_gy), d2: num(p.dose_secondary_gy), r: num(p.dose_rate_gy_min),
      b: num(p.beam_on_s), h: !!p.historical, s: p.state,
    };
  }

  function thin(points) {
    const kept = points.filter((_, i) => i % 2 === 0);
    if (kept[kept.length - 1] !== points[points.length - 1]) kept.push(points[points.length - 1]);
    return kept;
  }

  function addPoint(room, p) {
    const pt = pointOf(p);
    if (!pt) return;
    if (p.delivery_id !== room.historyDelivery) {
      if (!pt.h || room.history.every((q) => q.h)) {
        room.historyDelivery = p.delivery_id;
        room.history = [];
      } else {
        return;
      }
    }
    let i = room.history.length;
    while (i > 0 && room.history[i - 1].t > pt.t) i--;
    room.history.splice(i, 0, pt);
    if (room.history.length > model.config.history_points) room.history = thin(room.history);
  }

  // The applicator's displacement trace: one delivery at a time (null, no delivery, is a
  // trace of its own), as the server keeps it (dashboard/room.py, ApplicatorView).
  function addTracePoint(room, p) {
    const t = epochMs(p.at);
    if (t === null) return;
    const pt = { t, m: num(p.displacement_magnitude_mm), b: num(p.displacement_from_beam_on_mm), h: !!p.historical };
    if (p.delivery_id !== room.aplTraceDelivery) {
      if (!pt.h || room.aplTrace.every((q) => q.h)) {
        room.aplTraceDelivery = p.delivery_id;
        room.aplTrace = [];
      } else {
        return;
      }
    }
    let i = room.aplTrace.length;
    while (i > 0 && room.aplTrace[i - 1].t > pt.t) i--;
    room.aplTrace.splice(i, 0, pt);
    if (room.aplTrace.length > model.config.history_points) room.aplTrace = thin(room.aplTrace);
  }

  function applyMessage(m) {
    let room = model.rooms.get(m.room);
    if (!room) {
      // The overview holds a bounded number of rooms: the server's snapshot gives the
      // most recently valid ones; a flood of new rooms past that is counted, not held.
      if (!model.only && model.rooms.size >= MAX_ROOMS) { model.omitted += 1; return; }
      const [site, name] = m.room.split("/");
      room = newRoom(m.room, site, name);
      model.rooms.set(m.room, room);
      model.sites[site] = (model.sites[site] || 0) + 1;
      structureChanged = true;
    }
    const h = { payload: m.payload, rx: performance.now() - (m.age_ms || 0) };
    room.lastValid = h.rx;
    if (RETAINED.includes(m.name)) {
      room.retained[m.name] = h;
    } else if (m.name === "events") {
      if (!model.only) { room.dirty = true; return; }  // the overview shows no event list
      room.events.push(h);
      if (room.events.length > 200) room.events.splice(0, room.events.length - 200);
    } else if (m.name === "telemetry") {
      // A replayed sample is history, never the current state (docs/mqtt-topics.md rule 2).
      if (!m.payload.historical) room.telemetry = h;
      if (model.only) addPoint(room, m.payload);  // plots only on a room page
    } else if (m.name === "applicator") {
      if (!m.payload.historical) room.applicator = h;
      if (model.only) addTracePoint(room, m.payload);
    } else if (m.name === "alarms") {
      applyAlarms(room, m, h.rx);
    }
    room.dirty = true;
  }

  // ---- liveness: computed here, from this browser's clock ------------------------------
  function liveness(room, now) {
    const staleMs = model.config.stale_after_s * 1000;
    const last = lastMessageRx(room);
    const age = last === null ? null : now - last;
    const linkDead = !model.streamOpen || now - model.lastServerEvent > 3000 * model.config.tick_s;
    if (linkDead) return { live: false, word: "STALE", why: "no connection to the dashboard server", age };
    if (room.lastValid !== null && now - room.lastValid > model.config.age_out_s * 1000) {
      return { live: false, word: "AGED OUT", why: "nothing valid from this room for more than " + fmtSecs(model.config.age_out_s) + "; it will be removed", age };
    }
    if (!model.broker.connected) {
      return { live: false, word: "OFFLINE", why: "the dashboard has no broker connection (" + model.broker.reason + ")", age };
    }
    // A site whose bridge to this (central) broker is down: its rooms are unknown because
    // of the link, not offline nor merely stale (docs/dashboard.md, sites and their links).
    const link = model.links[room.site];
    if (link && !link.up) {
      return { live: false, word: "UNKNOWN", why: "site link down " + linkSince(link) + ": this room cannot be seen from here", age, linkDown: true };
    }
    const status = room.retained.status;
    if (!status) return { live: false, word: "OFFLINE", why: "no status from this room's daemon", age };
    if (status.payload.online !== true) return { live: false, word: "OFFLINE", why: "the daemon is offline", age };
    if (!room.telemetry) return { live: false, word: "STALE", why: "no live data yet", age };
    const tage = now - room.telemetry.rx;
    if (tage > staleMs) {
      return { live: false, word: "STALE", why: "no data for more than " + fmtSecs(model.config.stale_after_s) , age: tage };
    }
    return { live: true, word: "LIVE", why: "", age: tage };
  }

  function lastMessageRx(room) {
    if (room.telemetry) return room.telemetry.rx;
    let best = null;
    for (const h of Object.values(room.retained)) if (best === null || h.rx > best) best = h.rx;
    return best;
  }

  function isSim(room) {
    const t = room.telemetry, s = room.retained.status, d = room.retained.delivery;
    return !!((t && t.payload.sim) || (s && s.payload.sim) || (d && d.payload.sim));
  }

  // ---- formatting ------------------------------------------------------------------------
  function fmtGy(x, digits) {
    if (x === null || x === undefined) return "—";
    if (typeof x === "string") return x.toUpperCase();  // "nan", "inf": shown, never hidden
    return x.toFixed(digits === undefined ? 2 : digits);
  }
  function fmtTime(s) {
    if (s === null || s === undefined) return "—";
    if (typeof s === "string") return s.toUpperCase();
    const neg = s < 0;
    let t = Math.round(Math.abs(s));
    const h = Math.floor(t / 3600); t -= h * 3600;
    const m = Math.floor(t / 60); const sec = t - m * 60;
    const mm = (h > 0 ? String(m).padStart(2, "0") : String(m)) + ":" + String(sec).padStart(2, "0");
    return (neg ? "-" : "") + (h > 0 ? h + ":" + mm : mm);
  }
  function fmtSecs(s) {
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function fmtWall(ms) {
    return new Date(ms).toISOString().slice(11, 19) + " UTC";
  }
  // Since when a site's link is in its state: the change this dashboard saw, or (only the
  // retained state seen) no later than when it first saw it.
  function linkSince(link) {
    if (typeof link.since_ms === "number") return "since " + fmtWall(link.since_ms);
    return "since before " + fmtWall(link.seen_ms);
  }
  function fmtClock(ts) {
    const v = epochMs(ts);
    if (v === null) return "";
    return new Date(v).toISOString().slice(11, 19) + " UTC";
  }

  function beamOf(state) {
    switch (state) {
      case "IRRADIATING": return { key: "on", word: "BEAM ON" };
      case "READY": return { key: "ready", word: "READY" };
      case "PREPARATORY": return { key: "ready", word: "PREPARING" };
      case "INTERRUPTED": return { key: "interrupted", word: "INTERRUPTED" };
      case "TERMINATED": return { key: "off", word: "BEAM OFF" };
      case "FAULT": return { key: "fault", word: "FAULT" };
      case "EMERGENCY_STOP": return { key: "fault", word: "EMERGENCY STOP" };
      case "UNKNOWN": return { key: "fault", word: "UNKNOWN" };
      case undefined: case null: return { key: "unknown", word: "NO DATA" };
      default: return { key: "off", word: "BEAM OFF" };
    }
  }

  // ---- DOM helpers -----------------------------------------------------------------------
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }
  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }
  function setAttr(node, k, v) { if (node.getAttribute(k) !== v) node.setAttribute(k, v); }
  function icon(node, key) {
    if (node.dataset.icon !== key) { node.dataset.icon = key; node.innerHTML = ICONS[key] || ""; }
  }
  function setBar(bar, frac, label) {
    const f = Math.max(0, Math.min(1, frac || 0));
    bar.fill.style.width = (f * 100).toFixed(1) + "%";
    setText(bar.pct, label);
    setAttr(bar.root, "aria-valuenow", (f * 100).toFixed(0));
    setAttr(bar.root, "aria-valuetext", label);
  }
  function makeBar(label, small) {
    const fill = el("div", { class: "fill" });
    const pct = el("span", { class: "pct" });
    const root = el("div", {
      class: small ? "bar small" : "bar", role: "progressbar", "aria-label": label,
      "aria-valuemin": "0", "aria-valuemax": "100",
    }, fill, small ? null : pct);
    return { root, fill, pct };
  }

  // ---- the verification panel (verification.js), on a card and on the room page --------------
  // Large before beam-on: the phase is the live sample's when it is of the same delivery
  // (it is newer than the retained summary), else the summary's.
  // Without its script (verification.js did not load) the panel says so, in place, and
  // the rest of the page is drawn as ever.
  function buildVerification(id) {
    if (window.IortVerification) return window.IortVerification.build(id);
    const root = el("section", { class: "verif display-error", "data-outcome": "" },
      "VERIFICATION NOT SHOWN: the page's verification script did not load; reload the page");
    if (id) root.id = id;
    return { root, missing: true };
  }

  function renderVerification(panel, room, t, d) {
    if (panel.missing) return;
    const phase = d && t && t.delivery_id === d.delivery_id && t.phase ? t.phase : d ? d.phase : null;
    const reader = room.applicator ? room.applicator.payload : null;
    const sent = room.retained.delivery ? room.retained.delivery.payload.ts : null;
    window.IortVerification.render(panel, window.IortVerification.view(d, phase, reader, sent), ICONS);
  }

  // ---- the room page ----------------------------------------------------------------------
  let view = null;

  function buildRoomPage(main, key) {
    main.replaceChildren();
    const v = { key };
    v.root = el("div", { class: "room", id: "room", "data-room": key });
    v.sim = el("div", { class: "banner sim", id: "sim-banner", role: "note", hidden: "" });
    v.sim.innerHTML = ICONS.sim;
    v.sim.append(el("span", { text: "SIMULATED — data from a simulator, not a patient delivery" }));
    v.stale = el("div", { class: "banner staleness", id: "staleness", role: "alert", hidden: "" });
    v.staleIcon = el("span");
    v.staleText = el("span");
    v.stale.append(v.staleIcon, v.staleText);
    v.notice = el("div", { class: "banner notice", id: "notice", role: "alert", hidden: "" });
    v.err = el("div", { class: "banner display-error", id: "display-error", role: "alert", hidden: "" });
    v.title = el("h1", { text: "Room " + key });
    v.age = el("div", { class: "age", id: "age" });
    v.liveWord = el("span", { class: "live-word", id: "live-word" });
    const head = el("div", { class: "room-head" }, v.title, el("div", {}, v.liveWord, " ", v.age));

    // beam
    v.beam = el("div", { class: "beam-word", id: "beam-state", role: "status", "aria-live": "polite" });
    v.beamIcon = el("span");
    v.beamWord = el("span", { class: "beam-text" });
    v.beam.append(v.beamIcon, v.beamWord);
    v.beamSub = el("div", { class: "beam-sub", id: "beam-sub" });
    v.term = el("div", { class: "termination", id: "termination" });
    const beamPanel = el("section", { class: "panel beam", "aria-labelledby": "h-beam" },
      el("h2", { id: "h-beam", text: "Beam" }), v.beam, el("span", { class: "notlive", text: "NOT LIVE" }), v.beamSub, v.term);

    // dose
    v.d1 = el("span", { class: "big", id: "dose-primary" });
    v.preset = el("strong", { id: "preset" });
    v.bar1 = makeBar("delivered dose, primary channel, percent of preset");
    v.bar1.root.id = "progress-primary";
    v.d2 = el("strong", { id: "dose-secondary" });
    v.bar2 = makeBar("delivered dose, secondary channel, percent of preset", true);
    v.bar2.root.id = "progress-secondary";
    v.rate = el("strong", { id: "dose-rate" });
    v.rateExp = el("span", { id: "dose-rate-expected" });
    v.remGy = el("span", { id: "remaining-gy" });
    const dosePanel = el("section", { class: "panel", "aria-labelledby": "h-dose" },
      el("h2", { id: "h-dose", text: "Dose — primary channel, delivered of preset" }),
      el("div", { class: "dose-main" }, v.d1, el("span", { class: "unit", text: "Gy" }),
        el("span", { class: "of" }, "of ", v.preset, " Gy preset")),
      v.bar1.root,
      el("div", { class: "second" }, el("span", { text: "Secondary channel" }), v.d2, el("span", { class: "unit", text: "Gy" })),
      v.bar2.root,
      el("div", { class: "rate" }, "Dose rate ", v.rate, " Gy/min ", v.rateExp),
      el("div", { class: "rate" }, "Remaining dose ", v.remGy));

    // time
    v.elapsed = el("dd", { id: "elapsed" });
    v.beamOn = el("dd", { id: "beam-on" });
    v.remaining = el("dd", { id: "remaining" });
    v.planned = el("dd", { class: "minor", id: "planned" });
    v.backup = el("dd", { class: "minor", id: "backup-limit" });
    const timePanel = el("section", { class: "panel", "aria-labelledby": "h-time" },
      el("h2", { id: "h-time", text: "Time (min:s)" }),
      el("dl", { class: "times" },
        el("dt", { text: "Elapsed" }), v.elapsed,
        el("dt", { text: "Beam-on" }), v.beamOn,
        el("dt", { text: "Remaining" }), v.remaining,
        el("dt", { text: "Planned" }), v.planned,
        el("dt", { text: "Backup timer" }), v.backup));

    // plots
    v.plotDose = el("div", { class: "plot", id: "plot-dose" });
    v.plotRate = el("div", { class: "plot", id: "plot-rate" });
    const legend = (items) => el("div", { class: "legend" }, ...items.map(([c, t]) => el("span", { class: c, text: t })));
    const plots = el("div", { class: "grid row2" },
      el("section", { class: "panel", "aria-labelledby": "h-pd" },
        el("h2", { id: "h-pd", text: "Accumulated dose (Gy) over time" }), v.plotDose,
        legend([["l-delivered", "primary"], ["l-secondary", "secondary"], ["l-expected", "expected at this beam-on time"],
          ["l-preset", "preset"], ["l-replayed", "replayed (historical)"], ["l-gap", "no data (gap)"]])),
      el("section", { class: "panel", "aria-labelledby": "h-pr" },
        el("h2", { id: "h-pr", text: "Dose rate (Gy/min) over time" }), v.plotRate,
        legend([["l-delivered", "measured"], ["l-expected", "expected"], ["l-replayed", "replayed (historical)"], ["l-gap", "no data (gap)"]])));

    // interlocks, alarms, delivery facts
    v.allClear = el("div", { class: "all-clear", id: "all-clear" });
    v.interlocks = el("ul", { class: "list", id: "interlocks" });
    v.ilRows = {};
    for (const [k, name] of Object.entries(INTERLOCK_NAMES)) {
      const ic = el("span");
      const st = el("span", { class: "il-state" });
      const li = el("li", { "data-interlock": k, "data-state": "unknown" }, ic, el("span", { class: "il-name", text: name }), st);
      v.ilRows[k] = { li, ic, st };
      v.interlocks.append(li);
    }
    v.alarms = el("ul", { class: "list alarms", id: "alarms", "aria-live": "polite" });
    v.facts = el("dl", { class: "facts", id: "facts" });
    const row3 = el("div", { class: "grid row3" },
      el("section", { class: "panel", "aria-labelledby": "h-il" }, el("h2", { id: "h-il", text: "Interlocks" }), v.allClear, v.interlocks),
      el("section", { class: "panel", "aria-labelledby": "h-al" }, el("h2", { id: "h-al", text: "Alarms and notices, newest first" }), v.alarms),
      el("section", { class: "panel", "aria-labelledby": "h-dl" }, el("h2", { id: "h-dl", text: "Delivery and applicator" }), v.facts));

    // verification: large before beam-on, compact after (verification.js)
    v.verif = buildVerification("verification");
    // a physicist's sign-off of the ended delivery (signoff.js; absent: nothing to sign)
    v.signoff = window.IortSignoff ? window.IortSignoff.build() : null;
    v.alarmList = buildAlarmList();

    v.root.append(v.sim, v.stale, v.notice, v.err, head, v.verif.root, v.alarmList.root,
      el("div", { class: "grid row1" }, beamPanel, dosePanel, timePanel), plots, row3, buildApplicatorPanel(v));
    if (v.signoff) v.root.append(v.signoff.root);
    main.append(v.root);
    return v;
  }

  // ---- the applicator reader and stand ----------------------------------------------------
  // Its own liveness: the reader's messages stop while the source's go on (a lost reader
  // link), so the panel says STALE by itself, with the same rule and words as the room.
  function applicatorLiveness(room, now) {
    const roomLive = liveness(room, now);
    if (!room.applicator) return { live: false, word: "NO DATA", why: "no message from an applicator reader" };
    const age = now - room.applicator.rx;
    if (!roomLive.live && roomLive.word !== "STALE") return { live: false, word: roomLive.word, why: roomLive.why, age };
    if (!model.streamOpen || now - model.lastServerEvent > 3000 * model.config.tick_s) {
      return { live: false, word: "STALE", why: "no connection to the dashboard server", age };
    }
    if (age > model.config.stale_after_s * 1000) {
      return { live: false, word: "STALE", why: "no reading for more than " + fmtSecs(model.config.stale_after_s), age };
    }
    return { live: true, word: "LIVE", why: "", age };
  }

  // The daemon's applicator alarms (docs/alarms.md) and its own applicator interlock, from
  // the events this page holds (in arrival order): an alarm stands from its alarm_raised
  // until an alarm_cleared of its key; the interlock is the last monitor_interlock_changed.
  // None seen since the page opened leaves the interlock unknown, never OK.
  const APL_ALARMS = ["monitor_interlock", "applicator_mismatch", "applicator_displaced", "applicator_tilted"];
  const SEV_RANK = { high: 3, medium: 2, low: 1 };
  function applicatorAlarms(room) {
    const standing = new Map();
    let monitor = null;
    for (const e of room.events) {
      const p = e.payload;
      if (p.kind === "alarm_raised" && APL_ALARMS.includes(p.code)) { standing.delete(p.key); standing.set(p.key, p); }
      else if (p.kind === "alarm_cleared") standing.delete(p.key);
      else if (p.kind === "monitor_interlock_changed" && p.interlock === "applicator") monitor = p;
    }
    const alarms = [...standing.values()].sort((x, y) => (SEV_RANK[y.severity] || 0) - (SEV_RANK[x.severity] || 0));
    return { alarms, monitor };
  }

  // A yes/no sensor: "unknown" (or anything else) is shown as unknown, never as OK.
  function triState(x, yesWord, noWord) {
    if (x === "yes") return { state: "ok", word: yesWord };
    if (x === "no") return { state: "bad", word: noWord };
    return { state: "unknown", word: "UNKNOWN" };
  }

  function buildApplicatorPanel(v) {
    const a = {};
    a.live = el("span", { class: "live-word", id: "apl-live" });
    a.age = el("span", { class: "age", id: "apl-age" });
    a.identity = el("dd", { id: "apl-identity" });
    a.state = el("dd", { id: "apl-state" });
    const sensor = (id) => { const ic = el("span"); const w = el("span", { class: "il-state" }); return { dd: el("dd", { id, "data-state": "unknown" }, ic, w), ic, w }; };
    a.seated = sensor("apl-seated");
    a.locked = sensor("apl-locked");
    a.brakes = sensor("apl-brakes");
    a.monitor = sensor("apl-monitor");
    a.alarm = el("p", { class: "apl-alarm", id: "apl-alarm", role: "alert", hidden: "" });
    a.disp = el("dd", { id: "apl-displacement" });
    a.fromBeam = el("dd", { id: "apl-from-beam-on" });
    a.peak = el("dd", { id: "apl-peak" });
    a.tilt = el("dd", { id: "apl-tilt" });
    a.plot = el("div", { class: "plot", id: "plot-applicator" });
    a.legend = el("div", { class: "legend" }, el("span", { class: "l-delivered", text: "displacement from the lock" }),
      el("span", { class: "l-replayed", text: "replayed (historical)" }), el("span", { class: "l-tolerance", text: "tolerance" }));
    a.root = el("section", { class: "panel applicator", id: "applicator-panel", "aria-labelledby": "h-apl", "data-live": "false", "data-alarm": "" },
      el("h2", { id: "h-apl" }, "Applicator and stand ", a.live, " ", a.age),
      a.alarm,
      el("div", { class: "grid apl" },
        el("dl", { class: "facts" },
          el("dt", { text: "Applicator" }), a.identity,
          el("dt", { text: "Reader" }), a.state,
          el("dt", { text: "Seated" }), a.seated.dd,
          el("dt", { text: "Locked to source" }), a.locked.dd,
          el("dt", { text: "Stand brakes" }), a.brakes.dd,
          el("dt", { text: "Monitor interlock" }), a.monitor.dd,
          el("dt", { text: "Displacement (mm)" }), a.disp,
          el("dt", { text: "Since beam-on (mm)" }), a.fromBeam,
          el("dt", { text: "Peak (mm)" }), a.peak,
          el("dt", { text: "Tilt (°)" }), a.tilt),
        el("div", {}, a.plot, a.legend)));
    v.apl = a;
    return a.root;
  }

  function fmtMm(x) {
    if (x === null || x === undefined) return "unknown";
    if (typeof x === "string") return x.toUpperCase();  // "nan", "inf": the reader said so
    return x.toFixed(2);
  }

  function renderApplicator(v, room, now) {
    const a = v.apl;
    const live = applicatorLiveness(room, now);
    setAttr(a.root, "data-live", String(live.live));
    a.root.classList.toggle("stale", !live.live);
    setText(a.live, live.word);
    setAttr(a.live, "data-live", String(live.live));
    setText(a.age, live.age === undefined ? "" : "last reading " + fmtSecs(Math.max(0, live.age) / 1000) + " ago" + (live.live ? "" : " — " + live.why));
    const p = room.applicator ? room.applicator.payload : null;
    const id = p ? p.applicator : null;
    setText(a.identity, !p ? "—" : id ? [id.type, typeof id.diameter_mm === "number" ? id.diameter_mm + " mm" : null, id.serial ? "s/n " + id.serial : null,
      typeof p.uses_left === "number" ? p.uses_left + " uses left" : null].filter(Boolean).join(", ") : "none attached or not recognised");
    setText(a.state, !p ? "—" : p.state + (p.fault ? " — fault " + p.fault : "") + (p.device ? " (" + p.device + ")" : ""));
    setAttr(a.state, "data-state", p ? p.state : "");
    for (const [node, key, yes, no] of [[a.seated, "seated", "SEATED", "NOT SEATED"], [a.locked, "source_locked", "LOCKED", "NOT LOCKED"], [a.brakes, "brakes_engaged", "ENGAGED", "RELEASED"]]) {
      const t = triState(p ? p[key] : undefined, yes, no);
      setAttr(node.dd, "data-state", t.state);
      icon(node.ic, t.state === "ok" ? "ok" : t.state === "bad" ? "tripped" : "unknown");
      setText(node.w, t.word);
    }
    // The daemon's judgement: its applicator alarms in the panel's header, its interlock.
    const judged = applicatorAlarms(room);
    const top = judged.alarms[0];
    setAttr(a.root, "data-alarm", top ? (top.severity || "high") : "");
    a.alarm.hidden = !top;
    setText(a.alarm, !top ? "" : judged.alarms.map((x) => "ALARM " + String(x.severity || "").toUpperCase() + " " + x.code + ": " + (x.message || x.key) +
      " (since " + fmtClock(x.at || x.ts) + ")" + (x.historical ? " — REPLAYED" : "")).join(" · "));
    const mi = judged.monitor;
    const ms = mi ? mi.to : null;
    const mt = ms === "ok" ? { state: "ok", word: "OK" } : ms === "tripped" ? { state: "bad", word: "TRIPPED" } : { state: "unknown", word: "UNKNOWN" };
    setAttr(a.monitor.dd, "data-state", mt.state);
    icon(a.monitor.ic, mt.state === "ok" ? "ok" : mt.state === "bad" ? "tripped" : "unknown");
    setText(a.monitor.w, mt.word + (mi ? (mi.cause ? " — " + mi.cause : "") : " — not reported among the events this dashboard holds"));
    const dxyz = p && p.displacement_mm ? p.displacement_mm : null;
    setText(a.disp, !p ? "—" : fmtMm(p.displacement_magnitude_mm) + (dxyz ? " (x " + fmtMm(dxyz.x) + ", y " + fmtMm(dxyz.y) + ", z " + fmtMm(dxyz.z) + ")" : "") +
      (typeof p.tolerance_mm === "number" ? " · tolerance " + p.tolerance_mm.toFixed(2) : ""));
    setText(a.fromBeam, !p ? "—" : p.displacement_from_beam_on_mm === null ? "— (no beam-on yet)" : fmtMm(p.displacement_from_beam_on_mm));
    setText(a.peak, !p ? "—" : p.peak_displacement_mm === null ? "—" : fmtMm(p.peak_displacement_mm));
    setText(a.tilt, !p ? "—" : fmtMm(p.tilt_deg));
  }

  function renderApplicatorTrace(v, room) {
    const a = v.apl;
    const pts = room.aplTrace;
    const p = room.applicator ? room.applicator.payload : null;
    const tol = p && typeof p.tolerance_mm === "number" ? p.tolerance_mm : null;
    const t0 = pts.length ? pts[0].t : 0;
    const x = (q) => (q.t - t0) / 1000;
    const line = (wantHist) => {
      const out = [];
      for (const q of pts) out.push([x(q), q.h === wantHist ? q.m : null]);
      return out;
    };
    let ymax = tol !== null ? tol * 1.25 : 0;
    for (const q of pts) if (q.m !== null) ymax = Math.max(ymax, q.m * 1.1);
    drawPlot(a.plot, {
      xmax: Math.max(10, pts.length ? x(pts[pts.length - 1]) * 1.05 : 0), ymax: Math.max(0.5, ymax), bands: [],
      ylabel: "applicator displacement in mm over time",
      hlines: tol !== null ? [{ cls: "tolerance", y: tol }] : [],
      series: [{ cls: "series", points: line(false) }, { cls: "replayed", points: line(true) }],
    });
    a.legend.lastChild.hidden = tol === null;
    setAttr(a.plot, "data-points", String(pts.length));
    setAttr(a.plot, "data-tolerance", tol === null ? "" : String(tol));
  }

  function renderRoom(v, room, now, plotsToo) {
    const live = room ? liveness(room, now) : { live: false, word: "OFFLINE", why: "nothing received for this room", age: null };
    v.root.classList.toggle("stale", !live.live);
    setAttr(v.root, "data-live", String(live.live));
    setText(v.liveWord, live.word);
    setAttr(v.liveWord, "data-live", String(live.live));
    const ageText = live.age === null ? "no message yet" : "last message " + fmtSecs(Math.max(0, live.age) / 1000) + " ago";
    setText(v.age, ageText);
    if (live.live) {
      v.stale.hidden = true;
    } else {
      v.stale.hidden = false;
      v.stale.classList.toggle("stale-only", live.word === "STALE");
      icon(v.staleIcon, "stale");
      setText(v.staleText, live.word + " — NOT LIVE: " + live.why + "; " + ageText + ". Values shown are the last received.");
    }
    if (!room) return;
    // Each part is drawn on its own: one that throws is named in a banner, the others
    // (and the liveness above) go on updating.
    const failed = [];
    const guard = (name, fn) => {
      try { fn(); } catch (err) { failed.push(name); console.warn("room " + room.key + ", " + name + ": " + err); }
    };
    guard("beam, dose, time and interlocks", () => renderRoomFigures(v, room));
    guard("verification", () => {
      const dEnv = room.retained.delivery ? room.retained.delivery.payload : null;
      renderVerification(v.verif, room, room.telemetry ? room.telemetry.payload : null, dEnv ? dEnv.delivery : null);
    });
    guard("applicator", () => renderApplicator(v, room, now));
    guard("alarm list", () => renderAlarmList(v.alarmList, room));
    if (plotsToo) {
      const dEnv = room.retained.delivery ? room.retained.delivery.payload : null;
      const d = dEnv ? dEnv.delivery : null;
      guard("alarms", () => renderAlarms(v, room));
      guard("delivery facts", () => renderFacts(v, room, d));
      if (v.signoff) guard("sign-off", () => window.IortSignoff.render(v.signoff, room.key, d));
      guard("notices", () => renderNotice(v, room));
      guard("plots", () => renderPlots(v, room, d));
      guard("applicator trace", () => renderApplicatorTrace(v, room));
      v.plotFailed = failed.slice();
    }
    const all = [...new Set([...failed, ...(v.plotFailed || [])])];
    v.err.hidden = all.length === 0;
    if (all.length) setText(v.err, "DISPLAY ERROR — this room's " + all.join(", ") + " could not be shown; see the browser console");
  }

  function renderRoomFigures(v, room) {
    v.sim.hidden = !isSim(room);

    const t = room.telemetry ? room.telemetry.payload : null;
    const dEnv = room.retained.delivery ? room.retained.delivery.payload : null;
    const d = dEnv ? dEnv.delivery : null;
    // The room title is the daemon's own words (status), else the topic.
    const st = room.retained.status ? room.retained.status.payload : null;
    setText(v.title, "Room " + room.room + " · " + room.site + (st ? "" : ""));

    const beam = beamOf(t ? t.state : undefined);
    setAttr(v.beam, "data-beam", beam.key);
    setAttr(v.beam, "data-state", t ? String(t.state) : "");
    icon(v.beamIcon, beam.key);
    setText(v.beamWord, beam.word);
    const phase = (t && t.phase) || (d && d.phase) || "no delivery";
    setText(v.beamSub, "console " + (t ? t.state : "—") + " · delivery " + phase);
    if (d && d.termination) {
      setAttr(v.term, "data-status", d.termination);
      setText(v.term, "Terminated " + d.termination + (d.termination_reason ? ": " + d.termination_reason : ""));
    } else {
      setAttr(v.term, "data-status", "");
      setText(v.term, "");
    }

    // Dose: the live sample first (it is newer), the retained delivery summary otherwise.
    const preset = t && num(t.preset_gy) !== null ? t.preset_gy : d ? d.preset_gy : null;
    const d1 = t ? t.dose_primary_gy : d ? d.delivered_primary_gy : null;
    const d2 = t ? t.dose_secondary_gy : d ? d.delivered_secondary_gy : null;
    setText(v.d1, fmtGy(d1));
    setText(v.preset, fmtGy(preset));
    setText(v.d2, fmtGy(d2));
    const frac = (x) => (num(x) !== null && num(preset) ? x / preset : 0);
    setBar(v.bar1, frac(d1), Math.round(frac(d1) * 100) + " %");
    setBar(v.bar2, frac(d2), Math.round(frac(d2) * 100) + " %");
    const rate = t ? t.dose_rate_gy_min : d ? d.dose_rate_gy_min : null;
    setText(v.rate, fmtGy(rate, 3));
    setText(v.rateExp, d && num(d.expected_rate_gy_min) !== null ? "(expected " + fmtGy(d.expected_rate_gy_min, 3) + ")" : "");
    const remGy = t && t.remaining_gy !== null ? t.remaining_gy : d ? d.remaining_gy : null;
    setText(v.remGy, remGy === null ? "—" : fmtGy(remGy) + " Gy");

    setText(v.elapsed, fmtTime(t && t.elapsed_s !== null ? t.elapsed_s : d ? d.elapsed_s : null));
    setText(v.beamOn, fmtTime(t ? t.beam_on_s : d ? d.beam_on_s : null));
    const rem = t && t.estimated_remaining_s !== null ? t.estimated_remaining_s : d ? d.estimated_remaining_s : null;
    setText(v.remaining, fmtTime(rem));
    setText(v.planned, fmtTime(d ? d.planned_time_s : null));
    setText(v.backup, d && d.backup_timer_limit_s !== null ? "limit " + fmtTime(d.backup_timer_limit_s) : "—");

    // interlocks: every one by word and icon; unknown counts as tripped
    const il = room.retained.interlocks ? room.retained.interlocks.payload : null;
    for (const [k, row] of Object.entries(v.ilRows)) {
      const s = il && il.interlocks ? il.interlocks[k] || "unknown" : "unknown";
      setAttr(row.li, "data-state", s);
      icon(row.ic, s === "ok" ? "ok" : s === "tripped" ? "tripped" : "unknown");
      setText(row.st, s === "ok" ? "OK" : s === "tripped" ? "TRIPPED" : "UNKNOWN");
    }
    const clear = !!(il && il.all_clear);
    setAttr(v.allClear, "data-clear", String(clear));
    if (!il) setText(v.allClear, "No interlock report: all count as tripped");
    else if (clear) setText(v.allClear, "All clear");
    else {
      const bad = Object.values(il.interlocks || {}).filter((s) => s !== "ok").length;
      setText(v.allClear, "NOT CLEAR: " + bad + " tripped or unknown");
    }
  }

  function renderNotice(v, room) {
    let critical = null;
    for (const e of room.events) {
      const p = e.payload;
      if (p.kind === "daemon_notice") critical = p.severity === "critical" ? p : null;
    }
    v.notice.hidden = !critical;
    if (critical) setText(v.notice, "AUDIT LOG NOT WRITABLE — what is shown is not yet recorded: " + critical.message);
  }

  function renderAlarms(v, room) {
    const cleared = new Map();
    const items = [];
    for (const e of room.events) {
      const p = e.payload;
      if (p.kind === "alarm_cleared") cleared.set(p.key, p.at);
      if (p.kind === "alarm_raised") cleared.delete(p.key);
      if (p.kind === "alarm_raised" || p.kind === "daemon_notice") items.push(p);
    }
    // An alarm is cleared when an alarm_cleared of its key came after it.
    const clearedAfter = new Set();
    const seenClear = new Set();
    for (let i = room.events.length - 1; i >= 0; i--) {
      const p = room.events[i].payload;
      if (p.kind === "alarm_cleared") seenClear.add(p.key);
      if (p.kind === "alarm_raised" && seenClear.has(p.key)) clearedAfter.add(p);
    }
    const nodes = items.slice(-30).reverse().map((p) => {
      const sev = p.severity || "info";
      const isCleared = clearedAfter.has(p);
      const li = el("li", { class: isCleared ? "cleared" : "", "data-severity": sev, "data-kind": p.kind },
        el("span", { class: "sev", "data-sev": sev, text: sev.toUpperCase() }),
        el("span", { class: "alarm-msg", text: p.message || p.key || p.kind }),
        el("span", { class: "alarm-tag", text: p.kind === "daemon_notice" ? "NOTICE" : isCleared ? "CLEARED" : "ACTIVE" }),
        p.historical ? el("span", { class: "alarm-tag", text: "REPLAYED" }) : null,
        el("span", { class: "alarm-when", text: fmtClock(p.at || p.ts) }));
      return li;
    });
    if (nodes.length === 0) nodes.push(el("li", { class: "empty", text: "No alarm since the dashboard started" }));
    v.alarms.replaceChildren(...nodes);
  }

  // ---- the room's alarm list: the retained alarms topic (issue 19, item 3) ---------------
  // The daemon's own list of what stands and what waits for an acknowledgement; the server
  // (dashboard/alarms.py) sends it as rows in the page's order (standing unacknowledged
  // HIGH first), each with a stable id [key, raised_at, delivery_id], or to an overview as
  // counts. It is the only source of this list: the events above feed the event log only.
  // Each row keeps its element while its id stays, and has an .alarm-actions place where
  // ack.js puts the Acknowledge button for an operator's or physicist's session.
  const ALARM_ICONS = {
    high: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 2 23 21H1z" fill="currentColor"/><rect x="10.8" y="8" width="2.4" height="7" fill="#000"/><rect x="10.8" y="16.5" width="2.4" height="2.4" fill="#000"/></svg>',
    medium: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 1.5 22.5 12 12 22.5 1.5 12z" fill="currentColor"/><rect x="10.8" y="6.5" width="2.4" height="7" fill="#000"/><rect x="10.8" y="15" width="2.4" height="2.4" fill="#000"/></svg>',
    low: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="9.5" fill="none" stroke="currentColor" stroke-width="2.5"/><rect x="10.8" y="10" width="2.4" height="8" fill="currentColor"/><rect x="10.8" y="6" width="2.4" height="2.4" fill="currentColor"/></svg>',
  };

  function loadAlarms(room, r, now) {
    room.alarms = r.alarms ? { view: r.alarms, rx: now - r.alarms.age_ms } : null;
  }

  function applyAlarms(room, m, rx) {
    if (m.alarms) room.alarms = { view: m.alarms, rx };
  }

  // A time of day in UTC, with its date when it is not today's (the list can hold the
  // delivery before this one).
  function fmtAlarmTime(ts) {
    const v = epochMs(ts);
    if (v === null) return "—";
    const iso = new Date(v).toISOString();
    const today = new Date().toISOString().slice(0, 10);
    return (iso.slice(0, 10) === today ? "" : iso.slice(0, 10) + " ") + iso.slice(11, 19) + " UTC";
  }

  function alarmCountsText(a) {
    const high = a.standing_unacknowledged_high ? " (" + a.standing_unacknowledged_high + " HIGH standing)" : "";
    if (a.unacknowledged) return a.unacknowledged + " not acknowledged" + high;
    if (a.standing) return "none to acknowledge; " + a.standing + " standing, acknowledged";
    return "none";
  }

  function buildAlarmList() {
    const a = {};
    a.summary = el("p", { class: "alarm-list-summary", id: "alarm-list-summary" });
    a.list = el("ul", { class: "list alarm-list", id: "alarm-list", "aria-live": "polite" });
    a.omitted = el("p", { class: "alarm-list-omitted", id: "alarm-list-omitted", hidden: "" });
    // the last acknowledgement's outcome (ack.js): it stays when its row leaves the list
    a.status = el("p", { class: "alarm-ack-status", id: "alarm-ack-result", role: "status", "aria-live": "polite" });
    a.rows = new Map();
    a.root = el("section", { class: "panel alarm-list-panel", id: "alarm-list-panel", "aria-labelledby": "h-alarm-list", "data-top": "" },
      el("h2", { id: "h-alarm-list", text: "Alarms: standing, and cleared but not acknowledged" }), a.summary, a.list, a.omitted, a.status);
    a.shown = undefined;
    return a;
  }

  function buildAlarmRow() {
    const r = {};
    r.icon = el("span", { class: "sev-icon" });
    r.sev = el("span", { class: "sev" });
    r.msg = el("span", { class: "alarm-msg" });
    r.times = el("span", { class: "alarm-times" });
    r.ack = el("span", { class: "alarm-ack" });
    r.delivery = el("span", { class: "alarm-delivery" });
    r.actions = el("span", { class: "alarm-actions" });
    r.li = el("li", {}, r.icon, r.sev, r.msg, r.times, r.delivery, r.ack, r.actions);
    return r;
  }

  // The list holds the delivery before this one too: a row of another delivery says so.
  function renderAlarmRow(r, row, current) {
    const sev = String(row.severity);
    setAttr(r.li, "data-alarm-id", row.id);
    setAttr(r.li, "data-severity", sev);
    setAttr(r.li, "data-standing", String(!!row.standing));
    setAttr(r.li, "data-acknowledged", String(!!row.acknowledged));
    if (r.icon.dataset.icon !== sev) { r.icon.dataset.icon = sev; r.icon.innerHTML = ALARM_ICONS[sev] || ""; }
    setAttr(r.sev, "data-sev", sev);
    setText(r.sev, sev.toUpperCase());
    setText(r.msg, row.message || row.code || row.key);
    setText(r.times, "raised " + fmtAlarmTime(row.raised_at) + " · " + (row.standing ? "STANDING" : "cleared " + fmtAlarmTime(row.cleared_at)));
    const other = current !== null && row.delivery_id !== current;
    r.delivery.hidden = !other;
    setText(r.delivery, !other ? "" : row.delivery_id === null ? "between deliveries" : "earlier delivery " + row.delivery_id);
    const k = row.acknowledged;
    setText(r.ack, k ? "acknowledged by " + k.name + " (" + k.by + ") at " + fmtAlarmTime(k.at) : "NOT ACKNOWLEDGED");
  }

  // Puts the rows in order moving as few as possible: a new alarm arriving above the one a
  // person is typing an acknowledgement comment into must not take their focus away
  // (moving a focused node out of the document blurs it; keys typed after would go nowhere).
  function placeRows(list, nodes) {
    const focused = document.activeElement;
    const keep = new Set(nodes);
    for (const n of Array.from(list.children)) if (!keep.has(n)) n.remove();
    nodes.forEach((n, i) => { if (list.children[i] !== n) list.insertBefore(n, list.children[i] || null); });
    if (focused && focused !== document.activeElement && list.contains(focused)) {
      const sel = "selectionStart" in focused ? [focused.selectionStart, focused.selectionEnd] : null;
      focused.focus();
      if (sel && sel[0] !== null) focused.setSelectionRange(sel[0], sel[1]);
    }
  }

  function renderAlarmList(a, room) {
    const held = room.alarms;
    const t = room.telemetry ? room.telemetry.payload : null;
    const dEnv = room.retained.delivery ? room.retained.delivery.payload : null;
    const current = t && t.delivery_id ? t.delivery_id : dEnv && dEnv.delivery ? dEnv.delivery.delivery_id : null;
    const acting = window.IortAck ? window.IortAck.who() : "";
    if (a.shown === held && a.current === current && a.acting === acting) return;  // redrawn only on a change
    a.shown = held;
    a.current = current;
    a.acting = acting;
    if (!held) {
      setText(a.summary, "No alarm list from this room's daemon yet (a daemon older than this list sends none): the alarm events below are all there is");
      setAttr(a.root, "data-top", "");
      a.rows.clear();
      a.list.replaceChildren();
      a.omitted.hidden = true;
      return;
    }
    const view = held.view;
    const rows = view.rows || [];
    setText(a.summary, rows.length === 0 && !view.omitted ? "No standing or unacknowledged alarm"
      : view.unacknowledged + " not acknowledged · " + view.standing + " standing");
    // The panel takes the colour of its first row when that one stands unacknowledged.
    const top = rows[0];
    setAttr(a.root, "data-top", top && top.standing && !top.acknowledged ? String(top.severity) : "");
    const next = new Map();
    const nodes = rows.map((row) => {
      const r = a.rows.get(row.id) || buildAlarmRow();
      renderAlarmRow(r, row, current);
      if (window.IortAck) window.IortAck.render(r, row, room.key, a.status);
      next.set(row.id, r);
      return r.li;
    });
    a.rows = next;
    placeRows(a.list, nodes);
    a.omitted.hidden = !view.omitted;
    setText(a.omitted, view.omitted ? view.omitted + " more cleared alarms not acknowledged are not listed (beyond the daemon's 256): see the audit log" : "");
  }

  // The overview card's line: how many wait for an acknowledgement.
  function buildCardAlarms(c) {
    c.alarms = el("div", { class: "card-line card-alarms", "data-unacknowledged": "" });
    return c.alarms;
  }

  function renderCardAlarms(c, room) {
    const a = room.alarms ? room.alarms.view : null;
    setAttr(c.alarms, "data-unacknowledged", a ? String(a.unacknowledged) : "");
    setAttr(c.alarms, "data-high", String(!!(a && a.standing_unacknowledged_high)));
    setText(c.alarms, a ? "Alarms: " + alarmCountsText(a) : "Alarms: no list from this room's daemon");
  }

  // The DICOM hand-off of the delivery shown (events of kind dicom_handoff, each in the audit
  // log before it was published): each destination's latest outcome per instance, among the
  // events this page holds. Only the contract's words; the peer's detail for what failed.
  const HANDOFF_WORDS = {
    queued: "queued", stored: "stored", warning: "stored with a warning", failed: "store failed",
    refused: "refused", unreachable: "unreachable", committed: "committed",
    commit_failed: "not committed", overdue: "OVERDUE", build_failed: "not built",
  };
  const HANDOFF_DONE = new Set(["committed", "stored", "warning"]);
  function handoffText(room, did) {
    const last = new Map();
    const overdue = new Set(); // the alarm stands until the instance is stored or committed
    for (const e of room.events) {
      const p = e.payload;
      if (p.kind !== "dicom_handoff" || p.delivery_id !== did) continue;
      const key = p.destination + "\u0000" + (p.what || "");
      if (p.outcome === "overdue") {
        overdue.add(key);
        if (last.has(key)) continue;
      } else if (HANDOFF_DONE.has(p.outcome)) {
        overdue.delete(key);
      }
      last.set(key, p);
    }
    if (!last.size) return null;
    const dests = new Map();
    for (const [key, p] of last) {
      const quiet = HANDOFF_DONE.has(p.outcome) || p.outcome === "queued" || p.outcome === "overdue";
      const words = (p.what ? p.what + " " : "") + (HANDOFF_WORDS[p.outcome] || "?") +
        (overdue.has(key) && p.outcome !== "overdue" ? " (OVERDUE)" : "") +
        (quiet ? "" : " — attempt " + p.attempt + (p.detail ? ": " + p.detail : ""));
      if (!dests.has(p.destination)) dests.set(p.destination, []);
      dests.get(p.destination).push(words);
    }
    return [...dests].map(([name, items]) => name + ": " + items.join(", ")).join("; ");
  }

  function renderFacts(v, room, d) {
    const rows = [];
    const add = (k, val, id) => { rows.push(el("dt", { text: k }), el("dd", id ? { id, text: val } : { text: val })); };
    if (!d) {
      add("Delivery", room.retained.delivery ? "none yet" : "no delivery report");
    } else {
      add("Delivery", d.delivery_id);
      const a = d.applicator;
      add("Applicator", a ? [a.type, a.diameter_mm !== null && a.diameter_mm !== undefined ? a.diameter_mm + " mm" : null, a.serial ? "s/n " + a.serial : null].filter(Boolean).join(", ") : "not identified", "applicator");
      add("Phase", d.phase, "phase");
      add("Interruptions", d.interruptions.length === 0 ? "none" :
        d.interruptions.map((i) => i.cause + " at " + fmtGy(i.dose_at_start_gy) + " Gy" + (i.duration_s !== null ? " for " + fmtTime(i.duration_s) : " (ongoing)")).join("; "), "interruptions");
      add("Monitoring gaps", d.gaps.length === 0 ? "none" : d.gaps.length + " (" + d.gaps.map((g) => g.cause).join("; ") + ")", "gaps");
      add("Segments", String(d.segments.length));
      add("Termination", d.termination ? d.termination + (d.termination_reason ? " (" + d.termination_reason + ")" : "") : "not terminated", "termination-fact");
      if (d.joined_in_progress) add("Note", "joined in progress: the daemon started during this delivery");
      const handoff = handoffText(room, d.delivery_id);
      if (handoff) add("Hand-off to the hospital", handoff, "handoff");
    }
    const cp = room.retained["audit/checkpoint"];
    if (cp) add("Audit checkpoint", cp.payload.count + " entries, head " + String(cp.payload.head).slice(0, 12) + "…");
    const st = room.retained.status;
    if (st) add("Daemon", "iortd " + st.payload.software_version + ", session " + st.payload.session + (st.payload.online ? ", online" : ", OFFLINE"));
    const reasons = Object.entries(room.rejected).sort((a, b) => b[1] - a[1]).slice(0, 5);
    add("Rejected messages", room.rejectedTotal === 0 ? "none" :
      room.rejectedTotal + (reasons.length ? " (" + reasons.map(([r, n]) => r + ": " + n).join("; ") + ")" : ""), "rejected");
    if (room.eventsDropped) add("Events dropped", room.eventsDropped + " older events not kept (memory bound)", "events-dropped");
    const n = room.notices || {};
    if (n.seq_reset || n.seq_below_high_water) {
      add("Sequence", (n.seq_reset ? n.seq_reset + " mark(s) overtaken by the live stream (a forged or out-of-sequence seq)" : "") +
        (n.seq_reset && n.seq_below_high_water ? "; " : "") +
        (n.seq_below_high_water ? n.seq_below_high_water + " message(s) below the mark dropped" : ""), "sequence");
    }
    v.facts.replaceChildren(...rows);
  }

  // ---- plots: plain SVG, no library ------------------------------------------------------
  function niceStep(span, target) {
    const raw = span / Math.max(1, target);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }
  function timeStep(span) {
    for (const s of [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600]) if (span / s <= 7) return s;
    return 7200;
  }
  // SVG is written as markup and parsed by the HTML parser (which puts it in the SVG
  // namespace itself); every value is a number or escaped text.
  function esc(x) {
    return String(x).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
  }
  function tag(name, attrs, text) {
    let out = "<" + name;
    for (const [k, v] of Object.entries(attrs)) out += " " + k + '="' + esc(v) + '"';
    return text === undefined ? out + "/>" : out + ">" + esc(text) + "</" + name + ">";
  }

  /* series: [{cls, points: [[x, y|null], ...]}] (a null y breaks the line);
     bands: [[x0, x1, label]]; hlines: [{cls, y}] */
  function drawPlot(container, { xmax, ymax, series, bands, hlines, ylabel }) {
    const W = 640, H = 300, L = 56, R = 14, T = 12, B = 34;
    const parts = [];
    const xs = (x) => (L + (x / xmax) * (W - L - R)).toFixed(1);
    const ys = (y) => (H - B - (y / ymax) * (H - T - B)).toFixed(1);
    const ystep = niceStep(ymax, 5);
    for (let y = 0; y <= ymax + 1e-9; y += ystep) {
      parts.push(tag("line", { class: "grid-line", x1: L, x2: W - R, y1: ys(y), y2: ys(y) }));
      const lab = ystep < 0.1 ? y.toFixed(2) : ystep < 1 ? y.toFixed(1) : y.toFixed(0);
      parts.push(tag("text", { x: L - 6, y: (+ys(y) + 4).toFixed(1), "text-anchor": "end" }, lab));
    }
    const xstep = timeStep(xmax);
    for (let x = 0; x <= xmax + 1e-9; x += xstep) {
      parts.push(tag("line", { class: "grid-line", x1: xs(x), x2: xs(x), y1: T, y2: H - B }));
      parts.push(tag("text", { x: xs(x), y: H - B + 18, "text-anchor": "middle" }, fmtTime(x)));
    }
    for (const [x0, x1, label] of bands) {
      const a = +xs(Math.max(0, x0)), b = +xs(Math.min(xmax, x1));
      parts.push(tag("rect", { class: "gap", x: a, y: T, width: Math.max(3, b - a).toFixed(1), height: H - T - B, "data-band": label }));
      parts.push(tag("text", { class: "gap-label", x: (a + 4).toFixed(1), y: T + 14 }, label));
    }
    for (const h of hlines) parts.push(tag("line", { class: h.cls, x1: L, x2: W - R, y1: ys(h.y), y2: ys(h.y) }));
    for (const s of series) {
      let d = "", pen = false;
      for (const [x, y] of s.points) {
        if (y === null) { pen = false; continue; }
        d += (pen ? "L" : "M") + xs(x) + " " + ys(Math.min(y, ymax));
        pen = true;
      }
      if (d) parts.push(tag("path", { class: s.cls, d, "data-series": s.cls }));
    }
    parts.push(tag("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    parts.push(tag("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    const hatch = '<defs><pattern id="hatch-' + container.id + '" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">' +
      '<rect width="8" height="8" fill="#2a2d33"/><line x1="0" y1="0" x2="0" y2="8" stroke="#9aa0a8" stroke-width="3"/></pattern></defs>';
    container.innerHTML = '<svg viewBox="0 0 ' + W + " " + H + '" role="img" aria-label="' + esc(ylabel) + '" preserveAspectRatio="none">' +
      hatch + parts.join("").replaceAll('class="gap"', 'class="gap" fill="url(#hatch-' + container.id + ')"') + "</svg>";
  }

  function renderPlots(v, room, d) {
    const pts = room.history;
    const sameDelivery = d && d.delivery_id === room.historyDelivery;
    const t0 = sameDelivery && epochMs(d.started) !== null ? epochMs(d.started) : pts.length ? pts[0].t : 0;
    const x = (p) => (p.t - t0) / 1000;
    // A step much longer than the usual one between samples is a gap: the line breaks.
    const dts = [];
    for (let i = 1; i < pts.length; i++) dts.push(pts[i].t - pts[i - 1].t);
    const sorted = dts.slice().sort((a, b) => a - b);
    const typical = sorted.length ? sorted[Math.floor(sorted.length / 2)] : 0;
    const breakMs = Math.max(typical * 5, 1500);
    const bands = [];
    for (let i = 1; i < pts.length; i++) {
      if (pts[i].t - pts[i - 1].t > breakMs) bands.push([x(pts[i - 1]), x(pts[i]), "no data"]);
    }
    if (sameDelivery) {
      for (const g of d.gaps || []) {
        const a = epochMs(g.start), b = g.end ? epochMs(g.end) : pts.length ? pts[pts.length - 1].t : null;
        if (a !== null && b !== null) bands.push([(a - t0) / 1000, (b - t0) / 1000, "gap: " + g.cause]);
      }
    }
    const line = (key, wantHist) => {
      const out = [];
      let prev = null;
      for (const p of pts) {
        const broken = prev && p.t - prev.t > breakMs;
        const mine = p.h === wantHist;
        if (broken || !mine) out.push([x(p), null]);
        // Replayed and live lines meet: each includes the neighbouring point of the other.
        if (mine || (prev && prev.h === wantHist && !broken)) out.push([x(p), p[key]]);
        if (!mine) out.push([x(p), null]);
        prev = p;
      }
      return out;
    };
    const preset = d ? num(d.preset_gy) : null;
    const expRate = d ? num(d.expected_rate_gy_min) : null;
    const planned = d ? num(d.planned_time_s) : null;
    const last = pts.length ? x(pts[pts.length - 1]) : 0;
    const xmax = Math.max(10, last * 1.05, planned ? planned * 1.05 : 0);
    let maxDose = preset || 0, maxRate = expRate || 0;
    for (const p of pts) { if (p.d1 !== null) maxDose = Math.max(maxDose, p.d1); if (p.r !== null) maxRate = Math.max(maxRate, p.r); }
    const expected = [];
    if (expRate !== null) {
      for (const p of pts) {
        if (p.b === null) continue;
        const e = (expRate * p.b) / 60;
        expected.push([x(p), preset !== null ? Math.min(e, preset) : e]);
      }
    }
    drawPlot(v.plotDose, {
      xmax, ymax: Math.max(0.01, maxDose * 1.1), bands, ylabel: "accumulated dose in Gy over time",
      hlines: preset !== null ? [{ cls: "preset", y: preset }] : [],
      series: [
        { cls: "series2", points: line("d2", false) },
        { cls: "series", points: line("d1", false) },
        { cls: "replayed", points: line("d1", true) },
        { cls: "expected", points: expected },
      ],
    });
    drawPlot(v.plotRate, {
      xmax, ymax: Math.max(0.01, maxRate * 1.25), bands, ylabel: "dose rate in Gy per minute over time",
      hlines: expRate !== null ? [{ cls: "expected", y: expRate }] : [],
      series: [
        { cls: "series", points: line("r", false) },
        { cls: "replayed", points: line("r", true) },
      ],
    });
    setAttr(v.plotDose, "data-points", String(pts.length));
    setAttr(v.plotDose, "data-replayed", String(pts.filter((p) => p.h).length));
    setAttr(v.plotDose, "data-gaps", String(bands.length));
  }

  // ---- the overview ------------------------------------------------------------------------
  function buildOverview(main) {
    main.replaceChildren();
    const v = { cards: new Map(), heads: new Map() };
    v.root = el("div", { class: "overview", id: "overview" });
    const site = pageParams().site;
    v.h1 = el("h1", { text: site ? "Rooms of site " + site : "All rooms" });
    v.sim = el("div", { class: "banner sim", id: "sim-banner", role: "note", hidden: "" });
    v.sim.innerHTML = ICONS.sim;
    v.sim.append(el("span", { text: "SIMULATED data on this page: marked on each room" }));
    v.grid = el("div", { class: "cards", id: "cards" });
    v.none = el("p", { class: "no-rooms", text: "No room has published yet." });
    v.sites = el("nav", { class: "sites", id: "sites", "aria-label": "Sites" });
    v.pages = el("nav", { class: "pages", id: "pages", "aria-label": "Pages of rooms" });
    v.diag = el("details", { class: "diagnostics", id: "diagnostics" });
    v.diagSummary = el("summary");
    v.diagBody = el("dl", { class: "facts" });
    v.diag.append(v.diagSummary, v.diagBody);
    v.root.append(v.sim, v.h1, v.sites, v.none, v.pages, v.grid, v.diag);
    main.append(v.root);
    return v;
  }

  function pageParams() {
    const q = new URLSearchParams(location.search);
    const page = parseInt(q.get("page") || "1", 10);
    return { site: q.get("site") || null, page: Number.isFinite(page) && page > 0 ? page : 1 };
  }

  function overviewHref(site, page) {
    const q = new URLSearchParams();
    if (site) q.set("site", site);
    if (page > 1) q.set("page", String(page));
    const qs = q.toString();
    return "/" + (qs ? "?" + qs : "");
  }

  // The list of sites (each a link to its rooms) and the page links: rebuilt only when
  // the set of sites or the number of pages changes.
  function renderSites(v, keys) {
    const { site, page } = pageParams();
    const sig = JSON.stringify([model.sites, site, page, keys.length, model.omitted]);
    if (v.sitesSig === sig) return;
    v.sitesSig = sig;
    const names = Object.keys(model.sites).sort();
    const links = [el("a", site ? { href: "/" } : { href: "/", "aria-current": "page" }, "All sites")];
    for (const name of names) {
      const attrs = { href: overviewHref(name, 1), "data-site": name };
      if (name === site) attrs["aria-current"] = "page";
      links.push(el("a", attrs, name + " (" + model.sites[name] + ")"));
    }
    v.sites.replaceChildren(el("span", { text: "Sites: " }), ...links);
    v.sites.hidden = names.length < 2 && !site;
    const n = Math.max(1, Math.ceil(keys.length / model.config.page_size));
    const items = [];
    for (let i = 1; i <= n; i++) {
      const attrs = { href: overviewHref(site, i) };
      if (i === page) attrs["aria-current"] = "page";
      items.push(el("a", attrs, String(i)));
    }
    const omitted = model.omitted ? " (and " + model.omitted + " less recently active rooms not listed: choose a site)" : "";
    v.pages.replaceChildren(el("span", { text: "Page " + Math.min(page, n) + " of " + n + ", " + keys.length + " rooms" + omitted + ": " }), ...items);
    v.pages.hidden = n < 2 && !model.omitted;
  }

  function renderDiagnostics(v) {
    const d = model.diagnostics;
    if (!d) { v.diag.hidden = true; return; }
    v.diag.hidden = false;
    setText(v.diagSummary, "Diagnostics: " + d.rejected + " messages rejected, " + d.rooms_evicted + " rooms evicted, " + d.rooms_removed + " aged out");
    const sig = JSON.stringify(d);
    if (v.diagSig === sig) return;
    v.diagSig = sig;
    const rows = [];
    const add = (k, val) => rows.push(el("dt", { text: k }), el("dd", { text: val }));
    add("Accepted", String(d.accepted));
    add("Repeats dropped", String(d.repeats));
    if (d.ignored) add("Ignored (topics not shown here: commands)", String(d.ignored));
    add("Rejected", String(d.rejected));
    for (const [r, n] of Object.entries(d.rejected_by_reason || {}).slice(0, 10)) add("  " + r, String(n));
    const elsewhere = Object.entries(d.rejected_without_room || {});
    if (elsewhere.length) add("Rejected from topics with no valid room", elsewhere.slice(0, 10).map(([k, c]) => k + ": " + Object.values(c).reduce((a, b) => a + b, 0)).join("; "));
    add("Held", (d.bytes / 1048576).toFixed(1) + " MiB of " + (d.limits.max_bytes / 1048576).toFixed(0) + " MiB");
    add("Rooms evicted (memory)", String(d.rooms_evicted));
    add("Rooms aged out and removed", String(d.rooms_removed));
    if (d.dropped_busy) add("Dropped unread (dashboard busy)", String(d.dropped_busy));
    v.diagBody.replaceChildren(...rows);
  }

  function buildCard(room) {
    const c = {};
    c.root = el("section", { class: "card", "data-room": room.key, "aria-labelledby": "card-" + room.key });
    c.link = el("a", { href: "/room/" + encodeURIComponent(room.site) + "/" + encodeURIComponent(room.room), id: "card-" + room.key, text: room.room + " · " + room.site });
    c.badge = el("span", { class: "badge", text: "SIMULATED", hidden: "" });
    c.live = el("span", { class: "live-word" });
    c.root.append(el("h2", {}, c.link, el("span", {}, c.badge, " ", c.live)));
    c.beam = el("div", { class: "beam-word" });
    c.beamIcon = el("span");
    c.beamWord = el("span", { class: "beam-text" });
    c.beam.append(c.beamIcon, c.beamWord);
    c.verif = buildVerification(null);
    c.root.append(c.beam, c.verif.root);
    c.dose = el("span", { class: "big" });
    c.preset = el("span", { class: "of" });
    c.root.append(el("div", { class: "dose-main" }, c.dose, el("span", { class: "unit", text: "Gy" }), c.preset));
    c.bar = makeBar("delivered dose, percent of preset");
    c.root.append(c.bar.root);
    c.times = el("div", { class: "card-line" });
    c.il = el("div", { class: "card-line" });
    c.term = el("div", { class: "card-line" });
    c.apl = el("div", { class: "card-line apl", hidden: "" });
    c.age = el("div", { class: "age" });
    c.rejected = el("div", { class: "card-line rejected", hidden: "" });
    c.err = el("div", { class: "card-line display-error", role: "alert", hidden: "" });
    c.root.append(c.times, c.il, buildCardAlarms(c), c.apl, c.term, c.age, c.rejected, c.err);
    return c;
  }

  function renderCard(c, room, now) {
    const live = liveness(room, now);
    c.root.classList.toggle("stale", !live.live);
    setAttr(c.root, "data-live", String(live.live));
    setText(c.live, live.word);
    setAttr(c.live, "data-live", String(live.live));
    const sim = isSim(room);
    c.badge.hidden = !sim;
    const t = room.telemetry ? room.telemetry.payload : null;
    const dEnv = room.retained.delivery ? room.retained.delivery.payload : null;
    const d = dEnv ? dEnv.delivery : null;
    const beam = beamOf(t ? t.state : undefined);
    setAttr(c.beam, "data-beam", beam.key);
    icon(c.beamIcon, beam.key);
    setText(c.beamWord, beam.word);
    renderVerification(c.verif, room, t, d);
    const preset = t && num(t.preset_gy) !== null ? t.preset_gy : d ? d.preset_gy : null;
    const d1 = t ? t.dose_primary_gy : d ? d.delivered_primary_gy : null;
    setText(c.dose, fmtGy(d1));
    setText(c.preset, "of " + fmtGy(preset) + " Gy");
    const f = num(d1) !== null && num(preset) ? d1 / preset : 0;
    setBar(c.bar, f, Math.round(f * 100) + " %");
    const rem = t && t.estimated_remaining_s !== null ? t.estimated_remaining_s : d ? d.estimated_remaining_s : null;
    setText(c.times, "Elapsed " + fmtTime(t && t.elapsed_s !== null ? t.elapsed_s : d ? d.elapsed_s : null) + " · remaining " + fmtTime(rem));
    const il = room.retained.interlocks ? room.retained.interlocks.payload : null;
    const bad = il ? Object.entries(il.interlocks || {}).filter(([, s]) => s !== "ok") : [];
    setText(c.il, !il ? "Interlocks: no report" : il.all_clear ? "Interlocks: all clear" : "Interlocks NOT CLEAR: " + bad.map(([k, s]) => k + " " + s.toUpperCase()).join(", "));
    c.apl.hidden = !room.applicator;
    if (room.applicator) {
      const ap = room.applicator.payload;
      const al = applicatorLiveness(room, now);
      const w = (k, yes, no) => triState(ap[k], yes, no).word;
      setAttr(c.apl, "data-live", String(al.live));
      setText(c.apl, "Applicator " + w("seated", "seated", "NOT SEATED") + ", brakes " + w("brakes_engaged", "engaged", "RELEASED") +
        ", displacement " + fmtMm(ap.displacement_magnitude_mm) + " mm" + (al.live ? "" : " — " + al.word));
    }
    renderCardAlarms(c, room);
    setText(c.term, d && d.termination ? "Terminated " + d.termination + (d.termination_reason ? " (" + d.termination_reason + ")" : "") : d ? "Delivery " + d.phase : "No delivery yet");
    const ageText = live.age === null ? "no message yet" : "last message " + fmtSecs(Math.max(0, live.age) / 1000) + " ago";
    setText(c.age, live.live ? ageText : live.word + ": " + live.why + "; " + ageText);
    c.rejected.hidden = room.rejectedTotal === 0;
    setAttr(c.root, "data-rejected", String(room.rejectedTotal));
    if (room.rejectedTotal) setText(c.rejected, room.rejectedTotal + " messages rejected or dropped (not shown)");
    return sim;
  }

  function siteHead(v, site) {
    let h = v.heads.get(site);
    if (!h) {
      h = el("h2", { class: "site-head", "data-site": site });
      v.heads.set(site, h);
    }
    const link = model.links[site];
    const state = !link ? "none" : link.up ? "up" : "down";
    setAttr(h, "data-link", state);
    setText(h, "Site " + site + (state === "up" ? " · link up" : state === "down" ? " · SITE LINK DOWN " + linkSince(link) + ": its rooms are unknown" : ""));
    return h;
  }

  function renderOverview(v, now) {
    v.none.hidden = model.rooms.size > 0;
    let anySim = false;
    const keys = [...model.rooms.keys()].sort();
    const { page } = pageParams();
    const size = model.config.page_size;
    const last = Math.max(1, Math.ceil(keys.length / size));
    const shown = keys.slice((Math.min(page, last) - 1) * size, Math.min(page, last) * size);
    for (const key of v.cards.keys()) if (!model.rooms.has(key)) v.cards.delete(key);
    for (const key of shown) {
      const room = model.rooms.get(key);
      let c = v.cards.get(key);
      // One room that cannot be drawn shows DISPLAY ERROR on its own card; the loop goes on.
      try {
        if (!c) { c = buildCard(room); v.cards.set(key, c); }
        anySim = renderCard(c, room, now) || anySim;
        c.err.hidden = true;
        c.root.removeAttribute("data-error");
      } catch (err) {
        console.warn("room " + key + ": " + err);
        if (c) {
          c.root.setAttribute("data-error", "true");
          c.root.setAttribute("data-live", "false");  // never LIVE on a card that failed
          c.root.classList.add("stale");
          c.err.hidden = false;
          setText(c.err, "DISPLAY ERROR: this room's data could not be shown");
        }
      }
    }
    // Grouped by site: a heading before each site's first card says its link state.
    const ordered = [];
    let lastSite = null;
    for (const k of shown) {
      const c = v.cards.get(k);
      if (!c) continue;
      const site = k.split("/")[0];
      if (site !== lastSite) { ordered.push(siteHead(v, site)); lastSite = site; }
      ordered.push(c.root);
    }
    for (const site of v.heads.keys()) if (!shown.some((k) => k.split("/")[0] === site)) v.heads.delete(site);
    if (ordered.length !== v.grid.children.length || ordered.some((n, i) => v.grid.children[i] !== n)) v.grid.replaceChildren(...ordered);
    v.sim.hidden = !anySim;
    try { renderSites(v, keys); } catch (err) { console.warn("sites: " + err); }
    try { renderDiagnostics(v); } catch (err) { console.warn("diagnostics: " + err); }
  }



  // ---- the link to the server -----------------------------------------------------------
  const linkEl = () => document.getElementById("link");
  let structureChanged = true;
  let source = null;
  let lastPlot = 0;

  function connect(roomKey, site) {
    const url = "/events" + (roomKey ? "?room=" + encodeURIComponent(roomKey) : site ? "?site=" + encodeURIComponent(site) : "");
    source = new EventSource(url);
    source.addEventListener("open", () => { model.streamOpen = true; model.lastServerEvent = performance.now(); });
    source.addEventListener("error", () => {
      model.streamOpen = false;
      // The browser retries by itself unless it gave up (CLOSED): then we do.
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        setTimeout(() => connect(roomKey, site), 2000);
      }
    });
    source.addEventListener("snapshot", (e) => {
      loadSnapshot(JSON.parse(e.data));
      model.streamOpen = true;
      model.lastServerEvent = performance.now();
      lastPlot = 0;
    });
    source.addEventListener("msg", (e) => {
      model.lastServerEvent = performance.now();
      try { applyMessage(JSON.parse(e.data)); } catch (err) { console.warn("message not applied: " + err); }
    });
    source.addEventListener("removed", (e) => {
      model.lastServerEvent = performance.now();
      const m = JSON.parse(e.data);
      if (model.rooms.delete(m.room)) structureChanged = true;
      const site = m.room.split("/")[0];
      if (model.sites[site] > 1) model.sites[site] -= 1; else delete model.sites[site];
    });
    source.addEventListener("broker", (e) => { model.broker = JSON.parse(e.data); model.lastServerEvent = performance.now(); });
    source.addEventListener("tick", (e) => {
      model.lastServerEvent = performance.now();
      const t = JSON.parse(e.data);
      if (t.diagnostics) model.diagnostics = t.diagnostics;
      if (t.sites) model.sites = t.sites;
      if (t.links) model.links = t.links;
      for (const [key, n] of Object.entries(t.rejected || {})) {
        const room = model.rooms.get(key);
        if (room) room.rejectedTotal = n;
      }
    });
  }

  function renderLink(now) {
    const node = linkEl();
    const dead = !model.streamOpen || now - model.lastServerEvent > 3000 * model.config.tick_s;
    let text;
    if (dead) text = "NO CONNECTION to the dashboard server: reconnecting…";
    else if (!model.broker.connected) text = "Dashboard has NO BROKER connection (" + model.broker.url + "): every room offline";
    else text = "Connected: " + model.broker.url + " · stale after " + fmtSecs(model.config.stale_after_s);
    setText(node, text);
    node.classList.toggle("down", dead || !model.broker.connected);
  }

  function start() {
    const main = document.getElementById("main");
    const m = /^\/room\/([^/]+)\/([^/]+)\/?$/.exec(location.pathname);
    const roomKey = m ? decodeURIComponent(m[1]) + "/" + decodeURIComponent(m[2]) : null;
    if (roomKey) {
      document.title = "Room " + roomKey.split("/")[1] + " — IORT delivery";
      setText(document.getElementById("nav-title"), "Room " + roomKey.split("/")[1]);
      view = { kind: "room", v: buildRoomPage(main, roomKey), key: roomKey };
    } else {
      const { site } = pageParams();
      setText(document.getElementById("nav-title"), site ? "Site " + site : "Overview");
      view = { kind: "overview", v: buildOverview(main) };
    }
    connect(roomKey, roomKey ? null : pageParams().site);
    const frame = () => {
      const now = performance.now();
      renderLink(now);
      if (view.kind === "room") {
        const room = model.rooms.get(view.key) || null;
        const plotsDue = room && (structureChanged || (room.dirty && now - lastPlot > 500));
        renderRoom(view.v, room, now, !!plotsDue);
        if (plotsDue) { lastPlot = now; room.dirty = false; }
      } else {
        renderOverview(view.v, now);
        for (const r of model.rooms.values()) r.dirty = false;
      }
      structureChanged = false;
    };
    setInterval(frame, 200);
    frame();
  }

  // The login (login.js) says first whether this client may see; without it, the page
  // shows the login form and fetches nothing of the rooms.
  function startIfAllowed() {
    (window.iortAuth || Promise.resolve({ view: true })).then((a) => {
      if (a.view) start();
      else setText(linkEl(), "Log in to see the rooms");
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", startIfAllowed);
  else startIfAllowed();
})();
