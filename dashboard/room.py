"""One room as the dashboard holds it, and the checks every payload of a room passes.

:class:`Room` keeps, for one ``{site}/{room}``:

* the latest message of each retained topic (``status``, ``interlocks``, ``delivery``,
  ``audit/checkpoint``, ``alarms``), as the broker hands them to any new subscriber; the
  ``alarms`` list is served as rows in the page's order, or as counts to the overview
  (:mod:`iortd.dashboard.alarms`), never as the raw list beside them;
* the latest *live* ``telemetry`` (the current readings; a replayed sample is never the
  current state, docs/mqtt-topics.md rule 2) and when it arrived;
* a recent history of one delivery's telemetry for the plots, at most ``history_points``
  points: when full, every second point is dropped (:func:`thin`: the whole delivery stays
  in view at a coarser step);
* for the ``applicator`` topic (:class:`ApplicatorView`): the latest *live* message and when
  it arrived (its age is what the browser judges the reader's staleness by, apart from the
  source's telemetry: a silent reader shows stale on its panel while the dose goes on),
  and a displacement trace for the panel's plot, one delivery at a time (``None``, no
  delivery, is a trace of its own: the positioning before beam-on), at most
  ``history_points`` points thinned like the plots'. Values are kept as validated:
  ``"unknown"`` stays unknown and a null or ``"nan"`` reading is a gap in the trace,
  never a zero;
* the last ``events_kept`` messages of ``events``, and no more than ``events_bytes`` of
  them; what is dropped is counted and shown;
* per topic and ``session``, the highest ``seq`` handled (:class:`SeqTrack`), with the
  rules by which the real stream wins over a forged high-water mark (described in
  :mod:`iortd.dashboard.state`, which applies them to every message before a room sees it).

:func:`check_envelope` and :func:`point_of` are the payload-level checks. Everything here
is bounded and does no I/O; the gate in front of it (topics, sizes, schemas, the byte
budget of all rooms, ageing) is :class:`iortd.dashboard.state.Rooms`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from iortd.dashboard.alarms import alarm_view

__all__ = [
    "APPLICATOR_CODE",
    "PSEUDONYM",
    "ApplicatorView",
    "Held",
    "Rejected",
    "Room",
    "SeqTrack",
    "Verdict",
    "all_finite",
    "check_envelope",
    "epoch_ms",
    "point_of",
    "thin",
    "trace_point",
    "verification_error",
]

Payload = dict[str, Any]

SCHEMA = "iort/v1"
RETAINED = ("status", "interlocks", "delivery", "audit/checkpoint", "alarms")
EVENTS_BYTES = 1024 * 1024
RECENT = 256  # exact seqs remembered per topic and session, to drop repeats
LOWER_RUN = 3  # fresh messages in order below a mark that take over from it
SEQ_KEYS = 64  # (topic, session) tracks per room
POINT_BYTES = 160  # what one plot point costs, charged as such
# What the seq bookkeeping costs, charged as such (measured with tracemalloc, CPython 3.12:
# ~47 bytes per remembered seq, a deque slot and an int; a SeqTrack and its dict entry).
SEQ_BYTES = 56
TRACK_BYTES = 1024
ROOM_BYTES = 512  # the fixed cost of a room
# A prescription's pseudonyms and applicator code, as plan/model.py defines them (the
# dashboard imports only the kernel; a unit test keeps the two equal).
PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
APPLICATOR_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


class Rejected(ValueError):
    """A message not applied; ``reason`` is short and bounded (a counter key), the text
    says why."""

    def __init__(self, reason: str, detail: str | None = None, *, room: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.room = room


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_envelope(payload: object) -> Payload:
    """The payload if it carries a v1 envelope; :class:`Rejected` otherwise (the schema
    check that follows says the same in more detail; this one names the envelope)."""
    if not isinstance(payload, dict):
        raise Rejected("not a JSON object")
    if payload.get("schema") != SCHEMA:
        raise Rejected("schema is not iort/v1", f"schema {payload.get('schema')!r}"[:120])
    session, seq = payload.get("session"), payload.get("seq")
    if not (isinstance(session, int) and _is_int(session) and 1 <= session < 2**64) or not (
        isinstance(seq, int) and _is_int(seq) and 0 <= seq < 2**64
    ):
        raise Rejected("session/seq", f"session {session!r} / seq {seq!r}: expected integers"[:160])
    if not isinstance(payload.get("ts"), str):
        raise Rejected("ts missing")
    if not isinstance(payload.get("sim"), bool) or not isinstance(payload.get("historical"), bool):
        raise Rejected("sim/historical", "sim / historical must be booleans")
    return payload


def verification_error(payload: Payload) -> tuple[str, str] | None:
    """Why a schema-valid ``delivery`` payload's ``verification`` is not one a daemon can
    have sent, as (reason, detail); None if it is.

    ``verification inconsistent``: it says two things at once: VERIFIED with a failed or
    overridden item, NOT_VERIFIED with none failed or with overrides, VERIFIED_OVR whose
    overridden items are not exactly the failed ones (the contract:
    docs/schemas/v1/delivery.schema.json, its ``$defs.verification``). A page shown one
    could only pick one of its halves, and a green VERIFIED over a list of failures is the
    one that must never be drawn.

    ``verification ids``: a treatment or plan id that is not a pseudonym, or an
    applicator code that is not a code, as a prescription defines them (plan/model.py;
    the schema only bounds their length). A right-to-left override or a zero-width space
    would let "prescribed SPH30" read as another code, and a space is what a pseudonym
    never holds (a name)."""
    d = payload.get("delivery")
    v = d.get("verification") if isinstance(d, dict) else None
    if not isinstance(v, dict):
        return None
    outcome, reasons, overridden = v["outcome"], set(v["reasons"]), set(v["overridden"])
    odd = "verification inconsistent"
    if outcome == "VERIFIED" and (reasons or overridden):
        return odd, "VERIFIED with failed or overridden items"
    if outcome == "NOT_VERIFIED" and (not reasons or overridden):
        return odd, "NOT_VERIFIED without a failed item, or with overrides"
    if outcome == "VERIFIED_OVR" and (not overridden or reasons != overridden):
        return odd, "VERIFIED_OVR whose overridden items are not the failed ones"
    for key, shape in (
        ("treatment_id", PSEUDONYM),
        ("plan_id", PSEUDONYM),
        ("applicator_code", APPLICATOR_CODE),
    ):
        if v[key] is not None and not shape.fullmatch(v[key]):
            return "verification ids", f"{key}: not {shape.pattern}"
    return None


def all_finite(x: object) -> bool:
    """No float in ``x`` is infinite or NaN (``x`` has passed its schema: shallow)."""
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(all_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(all_finite(v) for v in x)
    return True


def epoch_ms(ts: object) -> float | None:
    if not isinstance(ts, str) or not ts.endswith("Z"):
        return None
    try:
        return datetime.fromisoformat(ts[:-1] + "+00:00").timestamp() * 1000.0
    except ValueError:
        return None


def _num(x: object) -> float | None:
    """A reading as a number; the texts "nan"/"inf" and null become None (not plotted)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x)


def point_of(p: Payload) -> Payload | None:
    """One plot point of a telemetry payload (compact keys), or None when the sample
    belongs to no delivery or has no usable time."""
    t = epoch_ms(p.get("at"))
    if p.get("delivery_id") is None or t is None:
        return None
    return {
        "t": t,  # device-clock time of the sample, ms since the epoch
        "d1": _num(p.get("dose_primary_gy")),
        "d2": _num(p.get("dose_secondary_gy")),
        "r": _num(p.get("dose_rate_gy_min")),
        "b": _num(p.get("beam_on_s")),
        "h": bool(p.get("historical")),
        "s": p.get("state"),
    }


def trace_point(p: Payload) -> Payload | None:
    """One trace point of an ``applicator`` payload (compact keys), or None without a
    usable time."""
    t = epoch_ms(p.get("at"))
    if t is None:
        return None
    return {
        "t": t,  # device-clock time, ms since the epoch
        "m": _num(p.get("displacement_magnitude_mm")),
        "b": _num(p.get("displacement_from_beam_on_mm")),
        "h": bool(p.get("historical")),
    }


def _insert(points: list[Payload], pt: Payload, max_points: int) -> list[Payload]:
    """``pt`` placed in time order among the last 64 points; thinned when over the bound."""
    start = max(0, len(points) - 64)
    i = bisect.bisect_right([q["t"] for q in points[start:]], pt["t"])
    points.insert(start + i, pt)
    return thin(points) if len(points) > max_points else points


@dataclass(slots=True)
class Held:
    payload: Payload
    mono: float  # when it arrived (dashboard's monotonic clock, seconds)
    size: int  # bytes on the wire, what holding it is charged

    def out(self, now: float) -> Payload:
        return {"payload": self.payload, "age_ms": round((now - self.mono) * 1000)}


class Verdict:
    NEW = "new"
    REPEAT = "repeat"
    BELOW = "below"
    RESET = "reset"


@dataclass(slots=True)
class SeqTrack:
    """Rule 1 with hostile publishers in mind: the highest ``seq`` handled in one topic
    and session, whether it came from the broker's retained store (``soft``), the last
    ``RECENT`` seqs (exact repeats), and a stream running below the mark, if any."""

    high: int
    soft: bool
    high_ts: float | None = None  # the mark's ts (ms since the epoch)
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT))
    lower: int | None = None
    lower_run: int = 0

    def judge(self, seq: int, retained: bool, window: int, ts: float | None = None) -> str:
        if seq in self.recent:
            return Verdict.REPEAT
        if seq > self.high:
            if seq - self.high > window:
                raise Rejected(
                    "seq jump",
                    f"seq {seq} is more than {window} past {self.high}, the highest handled",
                )
            self._take(seq, retained, ts)
            return Verdict.NEW
        if self.soft and not retained:
            # The mark came from the broker's store; a live message is newer whatever its
            # seq: the retained one was out of sequence (forged, or from a stray publisher).
            self._take(seq, retained, ts)
            return Verdict.RESET
        if ts is not None and self.high_ts is not None and ts > self.high_ts:
            # Sent after the mark, with a lower seq: the mark was out of sequence. (A
            # genuine reordering is the other way round: the late one is also older.)
            self._take(seq, retained, ts)
            return Verdict.RESET
        if self.lower is not None and self.lower < seq <= self.lower + window:
            self.lower_run += 1
        else:
            self.lower_run = 1
        self.lower = seq
        if self.lower_run >= LOWER_RUN:
            self.recent.clear()
            self._take(seq, retained, ts)
            return Verdict.RESET
        return Verdict.BELOW

    def _take(self, seq: int, retained: bool, ts: float | None) -> None:
        self.high, self.soft, self.high_ts = seq, retained, ts
        self.recent.append(seq)
        self.lower, self.lower_run = None, 0


@dataclass(slots=True)
class ApplicatorView:
    """A room's applicator reader: the latest live message and the displacement trace."""

    latest: Held | None = None
    trace_delivery: str | None = None
    trace: list[Payload] = field(default_factory=list)

    def add(self, payload: Payload, held: Held, max_points: int) -> None:
        if not payload["historical"]:
            self.latest = held
        pt = trace_point(payload)
        if pt is None:
            return
        delivery = payload["delivery_id"]
        if delivery != self.trace_delivery:
            # Another delivery starts another trace; a replay of another one does not
            # replace the live points of the current one.
            if not pt["h"] or all(q["h"] for q in self.trace):
                self.trace_delivery, self.trace = delivery, []
            else:
                return
        self.trace = _insert(self.trace, pt, max_points)

    @property
    def bytes(self) -> int:
        return (self.latest.size if self.latest else 0) + POINT_BYTES * len(self.trace)

    def snapshot(self, now: float, *, summary: bool) -> Payload:
        out: Payload = {"applicator": None if self.latest is None else self.latest.out(now)}
        if not summary:
            out["applicator_trace_delivery"] = self.trace_delivery
            out["applicator_trace"] = list(self.trace)
        return out


@dataclass
class Room:
    site: str
    room: str
    history_points: int
    events_kept: int
    events_bytes: int = EVENTS_BYTES
    retained: dict[str, Held] = field(default_factory=dict)
    telemetry: Held | None = None
    history_delivery: str | None = None
    history: list[Payload] = field(default_factory=list)
    applicator: ApplicatorView = field(default_factory=ApplicatorView)
    events: deque[Held] = field(default_factory=deque)
    events_held_bytes: int = 0
    events_dropped: int = 0
    # Seqs the room's daemon declared skipped (the skip topic): accounted for, never loss.
    skipped_seqs: int = 0
    last_valid: float = 0.0  # monotonic time of the last valid message
    bytes: int = ROOM_BYTES
    notices: dict[str, int] = field(default_factory=dict)
    _seen: dict[tuple[str, int], SeqTrack] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.site}/{self.room}"

    def judge_seq(self, name: str, payload: Payload, retained: bool, window: int) -> str:
        k = (name, int(payload["session"]))
        seq = int(payload["seq"])
        ts = epoch_ms(payload["ts"])
        track = self._seen.get(k)
        if track is None:
            track = self._seen[k] = SeqTrack(seq, retained, ts)
            track.recent.append(seq)
            if len(self._seen) > SEQ_KEYS:  # bound: old sessions are forgotten, oldest first
                for old in list(self._seen)[: SEQ_KEYS // 4]:
                    del self._seen[old]
            return Verdict.NEW
        return track.judge(seq, retained, window, ts)

    def stale_will(self, payload: Payload) -> bool:
        """Whether ``payload`` is an offline ``status`` older, by ``(session, seq)``, than
        the status held: a late will (daemon/mqtt/birth.py), not the room's news."""
        held = self.retained.get("status")
        if payload.get("online") is not False or held is None:
            return False
        h = held.payload
        return (int(payload["session"]), int(payload["seq"])) < (int(h["session"]), int(h["seq"]))

    def note(self, what: str) -> None:
        self.notices[what] = self.notices.get(what, 0) + 1

    def apply(self, name: str, payload: Payload, mono: float, size: int) -> int:
        """Hold one valid message; the change in bytes held."""
        before = self.bytes
        held = Held(payload, mono, size)
        self.last_valid = mono
        if name in RETAINED:
            self.retained[name] = held
        elif name == "events":
            self.events.append(held)
            self.events_held_bytes += size
            while self.events and (
                len(self.events) > self.events_kept or self.events_held_bytes > self.events_bytes
            ):
                gone = self.events.popleft()
                self.events_held_bytes -= gone.size
                self.events_dropped += 1
        elif name == "applicator":
            self.applicator.add(payload, held, self.history_points)
        elif name == "skip":
            s = payload["skipped"]
            self.skipped_seqs += s["last"] - s["first"] + 1
        else:
            if not payload["historical"]:
                self.telemetry = held
            self._add_point(payload)
        self.bytes = (
            ROOM_BYTES
            + sum(h.size for h in self.retained.values())
            + (self.telemetry.size if self.telemetry else 0)
            + self.events_held_bytes
            + POINT_BYTES * len(self.history)
            + self.applicator.bytes
            + TRACK_BYTES * len(self._seen)
            + SEQ_BYTES * sum(len(t.recent) for t in self._seen.values())
        )
        return self.bytes - before

    def _alarms(self, now: float, *, summary: bool) -> Payload | None:
        held = self.retained.get("alarms")
        if held is None:
            return None
        return {**alarm_view(held.payload, summary=summary), "age_ms": held.out(now)["age_ms"]}

    def _add_point(self, payload: Payload) -> None:
        pt = point_of(payload)
        if pt is None:
            return
        delivery = payload["delivery_id"]
        if delivery != self.history_delivery:
            # A new delivery starts a new plot. A replay of another delivery does not
            # replace live points of the current one.
            if not pt["h"] or all(q["h"] for q in self.history):
                self.history_delivery, self.history = delivery, []
            else:
                return
        self.history = _insert(self.history, pt, self.history_points)

    def snapshot(self, now: float, *, summary: bool, age_out_s: float) -> Payload:
        out: Payload = {
            "site": self.site,
            "room": self.room,
            # The alarm list goes as rows (all of them) or counts (the overview), not twice.
            "retained": {n: h.out(now) for n, h in self.retained.items() if n != "alarms"},
            "alarms": self._alarms(now, summary=summary),
            "telemetry": None if self.telemetry is None else self.telemetry.out(now),
            "last_valid_age_ms": round((now - self.last_valid) * 1000),
            "aged_out": now - self.last_valid > age_out_s,
            "bytes": self.bytes,
            "events_dropped": self.events_dropped,
            "notices": dict(self.notices),
            **self.applicator.snapshot(now, summary=summary),
        }
        if not summary:
            out["history_delivery"] = self.history_delivery
            out["history"] = list(self.history)
            out["events"] = [h.out(now) for h in self.events]
        return out


def thin(points: list[Payload]) -> list[Payload]:
    """Every second point, keeping the last (the newest must stay in the plot)."""
    kept = points[::2]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept
