"""What the dashboard knows: built only from MQTT messages that pass every check, bounded
in bytes, no I/O.

Per room (``{site}/{room}`` under ``{prefix}/v1/``) it keeps:

* the latest message of each retained topic (``status``, ``interlocks``, ``delivery``,
  ``audit/checkpoint``), as the broker hands them to any new subscriber;
* the latest *live* ``telemetry`` (the current readings; a replayed sample is never the
  current state, docs/mqtt-topics.md rule 2) and when it arrived;
* a recent history of one delivery's telemetry for the plots, at most ``history_points``
  points: when full, every second point is dropped (the whole delivery stays in view at a
  coarser step);
* the last ``events_kept`` messages of ``events`` (alarms, notices, phase changes), and no
  more than ``events_bytes`` of them; what is dropped is counted and shown;
* per topic and ``session``, the highest ``seq`` handled (:class:`SeqTrack`).

**Hostile input** (issue 13). Anyone with publish rights under ``{prefix}/v1/`` can send
anything; one message must never freeze, pin or hide a room. So a message is applied only
when all of these hold, and is otherwise rejected with a short reason, counted per room
and reason (shown in the snapshot's ``rejected`` and ``diagnostics``) and never shown:

1. the topic is ``{prefix}/v1/{site}/{room}/{name}`` with a known name, and site and room
   are slugs as a daemon's config requires (so no look-alike of a real room's name);
2. the payload is at most ``max_payload_bytes``, checked *before* parsing;
3. it is JSON (orjson: no NaN/Infinity, integers within 64 bits, nesting bounded);
4. it validates against the published schema of its topic (`iortd.dashboard.schemas`), and a
   ``status`` names the room of its topic;
5. its ``seq`` and ``session`` are at most 2^53 (the schema allows 64 bits, but no daemon
   gets there and a browser cannot represent more), and ``seq`` is not a jump of more
   than ``seq_window`` past the highest handled in its topic and session (a forged
   ``2^64-1`` would otherwise hide every later genuine message, rule 1 read naively).

The real stream always wins over a forged high-water mark that was within the window or
could not be judged when it came (the first message of a session, or one handed over
from the broker's retained store): a fresh message below the mark takes over at once if
it is *live* and the mark came from the retained store, or if its ``ts`` is later than
the mark's (it was sent after it: the mark was out of sequence; a genuine reordering is
the other way round, and a ``ts`` more than ``future_s`` ahead of the dashboard's clock is
refused); and ``LOWER_RUN`` fresh messages in order below any mark take over too (counted
as ``seq_reset``). Exact repeats (the last ``RECENT`` seqs) are dropped as before. None of
this authenticates anything: a publisher who sends the next ``seq`` with false content is
believed. Only the broker's ACL (config/mosquitto/, docs/dashboard.md) stops that.

**Memory** is bounded in bytes, not counts: every held message is charged its size on
the wire; a room holds at most five payloads, ``events_bytes`` of events,
``history_points`` points and ``SEQ_KEYS`` x ``RECENT`` remembered seqs (charged as
measured: a publisher cycling sessions otherwise made a room hold ~650 KB charged under
1 KB); all rooms together at most ``max_bytes``, beyond which the room
that has gone longest without a valid message is evicted (counted). There is no cap on the
number of rooms, so retained rooms that publish nothing can never keep a live one out.
**Ageing**: a room with no valid message for ``age_out_s`` is marked ``aged_out`` in the
snapshot; after twice that, `Rooms.sweep` removes it (counted).

Receipt times are the dashboard's monotonic clock; a snapshot gives each one as an age, so
that a browser computes staleness with its own clock whatever the skew between machines.
A restart of the dashboard forgets all of it and rebuilds from the retained topics.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from iortd.dashboard.schemas import schema_error

__all__ = [
    "RETAINED",
    "Accepted",
    "Rejected",
    "Room",
    "Rooms",
    "parse_topic",
    "point_of",
]

SCHEMA = "iort/v1"
RETAINED = ("status", "interlocks", "delivery", "audit/checkpoint")
STREAMS = ("telemetry", "events")
NAMES = RETAINED + STREAMS
# Topics of the contract (ARCHITECTURE: applicator, alarms, signed commands in) that the
# dashboard does not show: passed over, counted as ``ignored``, never as invalid, so that
# a room's card does not report its own commands or future topics as rejected.
NOT_SHOWN = ("applicator", "alarms")
NOT_SHOWN_PREFIX = "cmd/"
# A site or room level: the daemon's slug (its config and the status schema: a-z, 0-9, '-',
# at most 63). Anything else no daemon can publish, and would let a look-alike of a real
# room ("or-1" spelt with a bidi override, a zero-width space, a non-ASCII hyphen) show a
# card under that room's name.
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

# Defaults, also the CLI's (docs/dashboard.md, "What it holds").
MAX_PAYLOAD_BYTES = 256 * 1024
EVENTS_BYTES = 1024 * 1024
MAX_BYTES = 256 * 1024 * 1024
SEQ_WINDOW = 1 << 24  # ~9.7 days of 20 Hz telemetry missed, still a gap, not a jump
FUTURE_S = 3600.0  # a ts further ahead of the dashboard's clock is refused
AGE_OUT_S = 86400.0  # a day: a running daemon publishes every sample, so only dead ones age
RECENT = 256  # exact seqs remembered per topic and session, to drop repeats
LOWER_RUN = 3  # fresh messages in order below a mark that take over from it
SEQ_KEYS = 64  # (topic, session) tracks per room
PLAUSIBLE = 2**53  # the largest seq or session believed (JavaScript's exact integers)
POINT_BYTES = 160  # what one plot point costs, charged as such
# What the seq bookkeeping costs, charged as such (measured with tracemalloc, CPython 3.12:
# ~47 bytes per remembered seq, a deque slot and an int; a SeqTrack and its dict entry).
SEQ_BYTES = 56
TRACK_BYTES = 1024
ROOM_BYTES = 512  # the fixed cost of a room
REJECT_ROOMS = 1024  # rooms (or would-be rooms) with reject counters
REASONS_PER_ROOM = 32
NO_ROOM = "(no room)"
OTHER = "(other)"

Payload = dict[str, Any]


class Rejected(ValueError):
    """A message not applied; ``reason`` is short and bounded (a counter key), the text
    says why."""

    def __init__(self, reason: str, detail: str | None = None, *, room: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.room = room


def parse_topic(prefix: str, topic: str) -> tuple[str, str, str]:
    """``(site, room, name)`` of ``{prefix}/v1/{site}/{room}/{name}``."""
    head = f"{prefix}/v1/"
    if not topic.startswith(head):
        raise Rejected("topic not under prefix", f"topic {topic[:200]!r} is not under {head}")
    parts = topic[len(head) :].split("/", 2)
    if len(parts) != 3 or not all(_SLUG.fullmatch(p) for p in parts[:2]):
        raise Rejected(
            "topic shape",
            f"topic {topic[:200]!r}: expected {head}SITE/ROOM/NAME, SITE and ROOM slugs "
            "(a-z, 0-9 and '-', at most 63)",
        )
    site, room, name = parts
    if name not in NAMES:
        raise Rejected(
            "unknown topic name", f"topic {topic[:200]!r}: unknown name", room=f"{site}/{room}"
        )
    return site, room, name


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


def _finite(x: object) -> bool:
    """No float in ``x`` is infinite or NaN (``x`` has passed its schema: shallow)."""
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


def _epoch_ms(ts: object) -> float | None:
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
    t = _epoch_ms(p.get("at"))
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
    events: deque[Held] = field(default_factory=deque)
    events_held_bytes: int = 0
    events_dropped: int = 0
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
        ts = _epoch_ms(payload["ts"])
        track = self._seen.get(k)
        if track is None:
            track = self._seen[k] = SeqTrack(seq, retained, ts)
            track.recent.append(seq)
            if len(self._seen) > SEQ_KEYS:  # bound: old sessions are forgotten, oldest first
                for old in list(self._seen)[: SEQ_KEYS // 4]:
                    del self._seen[old]
            return Verdict.NEW
        return track.judge(seq, retained, window, ts)

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
            + TRACK_BYTES * len(self._seen)
            + SEQ_BYTES * sum(len(t.recent) for t in self._seen.values())
        )
        return self.bytes - before

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
        i = bisect.bisect_right([q["t"] for q in self.history[-64:]], pt["t"])
        start = max(0, len(self.history) - 64)
        self.history.insert(start + i, pt)
        if len(self.history) > self.history_points:
            self.history = thin(self.history)

    def snapshot(self, now: float, *, summary: bool, age_out_s: float) -> Payload:
        out: Payload = {
            "site": self.site,
            "room": self.room,
            "retained": {n: h.out(now) for n, h in self.retained.items()},
            "telemetry": None if self.telemetry is None else self.telemetry.out(now),
            "last_valid_age_ms": round((now - self.last_valid) * 1000),
            "aged_out": now - self.last_valid > age_out_s,
            "bytes": self.bytes,
            "events_dropped": self.events_dropped,
            "notices": dict(self.notices),
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


@dataclass(frozen=True, slots=True)
class Accepted:
    room: Room
    name: str
    payload: Payload
    size: int = 0  # bytes on the wire


class Rooms:
    """Every room seen under ``{prefix}/v1/``, bounded in bytes (not in number)."""

    def __init__(
        self,
        prefix: str,
        *,
        history_points: int = 4000,
        events_kept: int = 200,
        events_bytes: int = EVENTS_BYTES,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        max_bytes: int = MAX_BYTES,
        seq_window: int = SEQ_WINDOW,
        age_out_s: float = AGE_OUT_S,
        future_s: float = FUTURE_S,
    ) -> None:
        self.prefix = prefix
        self.history_points = history_points
        self.events_kept = events_kept
        self.events_bytes = events_bytes
        self.max_payload_bytes = max_payload_bytes
        self.max_bytes = max_bytes
        self.seq_window = seq_window
        self.age_out_s = age_out_s
        self.future_s = future_s
        self.rooms: dict[str, Room] = {}
        self.bytes = 0
        self.accepted = 0
        self.repeats = 0
        self.ignored = 0  # topics of the contract the dashboard does not show
        self.rejected = 0
        self.rooms_evicted = 0
        self.rooms_removed = 0
        self.dropped_busy = 0  # received but not handled: the incoming queue was full
        self._gone: list[str] = []  # rooms evicted since the last take_gone()
        # room key (or NO_ROOM / OTHER) -> reason -> count; bounded both ways
        self.rejects: dict[str, dict[str, int]] = {}

    @property
    def limits(self) -> Payload:
        return {
            "max_payload_bytes": self.max_payload_bytes,
            "max_bytes": self.max_bytes,
            "events_bytes": self.events_bytes,
            "events_kept": self.events_kept,
            "history_points": self.history_points,
            "seq_window": self.seq_window,
            "age_out_s": self.age_out_s,
            "future_s": self.future_s,
        }

    def receive(
        self,
        topic: str,
        data: bytes,
        mono: float,
        *,
        retained: bool = False,
        wall: float | None = None,
    ) -> Accepted | None:
        """One MQTT message as received: its size is checked before it is parsed. None for
        a repeat or a topic not shown (``NOT_SHOWN``); :class:`Rejected` (counted) for
        anything not applied."""
        if self.not_shown(topic):
            self.ignored += 1
            return None
        if len(data) > self.max_payload_bytes:
            exc = Rejected(
                "payload too large",
                f"payload of {len(data)} bytes is too large (limit {self.max_payload_bytes})",
            )
            self._count(exc, self.room_of(topic))
            raise exc
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            exc = Rejected("not JSON", f"not JSON: {str(err)[:120]}")
            self._count(exc, self.room_of(topic))
            raise exc from None
        return self.accept(topic, payload, mono, size=len(data), retained=retained, wall=wall)

    def accept(
        self,
        topic: str,
        payload: object,
        mono: float,
        *,
        size: int | None = None,
        retained: bool = False,
        wall: float | None = None,
    ) -> Accepted | None:
        """Apply one parsed message. None for a repeat; :class:`Rejected` (counted) if it
        is not applied. ``wall`` (the dashboard's UTC clock, seconds since the epoch)
        enables the check that ``ts`` is not in the future."""
        try:
            return self._accept(topic, payload, mono, size, retained, wall)
        except Rejected as exc:
            self._count(exc, exc.room or self.room_of(topic))
            raise

    def _accept(
        self,
        topic: str,
        payload: object,
        mono: float,
        size: int | None,
        retained: bool,
        wall: float | None,
    ) -> Accepted | None:
        site, room_name, name = parse_topic(self.prefix, topic)
        key = f"{site}/{room_name}"
        if size is None:
            size = len(orjson.dumps(payload))
        if size > self.max_payload_bytes:
            raise Rejected("payload too large", room=key)
        p = check_envelope(payload)
        reason = schema_error(name, p)
        if reason is not None:
            raise Rejected(reason, room=key)
        if p["seq"] > PLAUSIBLE or p["session"] > PLAUSIBLE:
            # The schema allows 64 bits; no daemon gets past 2^53 (285,000 years at 1 kHz)
            # and a browser cannot even represent it: a forgery, whatever else it says.
            raise Rejected("seq/session beyond 2^53", room=key)
        if not _finite(p):
            # JSON has no infinity, but 1e999 parses to one and the schema's "number"
            # takes it; the daemon never sends it (it writes "inf").
            raise Rejected("number out of range", room=key)
        if name == "status" and (p["site"], p["room"]) != (site, room_name):
            raise Rejected("status names another room", room=key)
        ts = _epoch_ms(p["ts"])
        if wall is not None and ts is not None and ts > (wall + self.future_s) * 1000:
            # A future-dated message would win every comparison of time (SeqTrack); no
            # daemon's clock is that far ahead of ours.
            raise Rejected("ts in the future", room=key)
        room = self.rooms.get(key)
        if room is None:
            room = Room(site, room_name, self.history_points, self.events_kept, self.events_bytes)
            room.last_valid = mono
            verdict = room.judge_seq(name, p, retained, self.seq_window)
            self.rooms[key] = room
            self.bytes += room.bytes
        else:
            try:
                verdict = room.judge_seq(name, p, retained, self.seq_window)
            except Rejected as exc:
                exc.room = key
                raise
        if verdict in (Verdict.REPEAT, Verdict.BELOW):
            # Below the mark and not seen: a late duplicate, a reordering, or a stream
            # hidden by a forged mark (which takes over after LOWER_RUN, counted).
            if verdict == Verdict.BELOW:
                room.note("seq_below_high_water")
            self.repeats += 1
            return None
        if verdict == Verdict.RESET:
            room.note("seq_reset")
        self.bytes += room.apply(name, p, mono, size)
        self.accepted += 1
        # Room state is O(1) to reorder: the most recently valid room goes last.
        self.rooms[key] = self.rooms.pop(key)
        self._evict(keep=key)
        return Accepted(room, name, p, size)

    def _evict(self, keep: str) -> None:
        """Over the byte bound: the rooms longest without a valid message go first."""
        while self.bytes > self.max_bytes and len(self.rooms) > 1:
            oldest = next(iter(self.rooms))
            if oldest == keep:
                break
            self._remove(oldest)
            self.rooms_evicted += 1
            self._gone.append(oldest)

    def take_gone(self) -> list[str]:
        """The rooms evicted for memory since the last call (to tell the browsers)."""
        gone, self._gone = self._gone, []
        return gone

    def _remove(self, key: str) -> None:
        room = self.rooms.pop(key)
        self.bytes -= room.bytes
        self.rejects.pop(key, None)

    def sweep(self, now: float) -> list[str]:
        """Remove the rooms with no valid message for twice ``age_out_s``; their keys."""
        gone = [k for k, r in self.rooms.items() if now - r.last_valid > 2 * self.age_out_s]
        for key in gone:
            self._remove(key)
            self.rooms_removed += 1
        return gone

    def not_shown(self, topic: str) -> bool:
        """Whether ``topic`` is one of the contract's that the dashboard passes over."""
        head = f"{self.prefix}/v1/"
        parts = topic[len(head) :].split("/", 2) if topic.startswith(head) else []
        return len(parts) == 3 and (parts[2] in NOT_SHOWN or parts[2].startswith(NOT_SHOWN_PREFIX))

    def room_of(self, topic: str) -> str:
        """The room key of ``topic`` (``site/room``), or ``NO_ROOM`` if it names none."""
        try:
            site, room, _ = parse_topic(self.prefix, topic)
        except Rejected as exc:
            return exc.room or NO_ROOM
        return f"{site}/{room}"

    def refuse(self, topic: str, exc: Rejected) -> None:
        """Count a message refused before it reached `receive` (see dashboard.mqtt)."""
        self._count(exc, exc.room or self.room_of(topic))

    def _count(self, exc: Rejected, room: str) -> None:
        self.rejected += 1
        if room not in self.rejects and len(self.rejects) >= REJECT_ROOMS:
            room = OTHER
        counts = self.rejects.setdefault(room, {})
        reason = exc.reason
        if reason not in counts and len(counts) >= REASONS_PER_ROOM:
            reason = OTHER
        counts[reason] = counts.get(reason, 0) + 1

    def snapshot(
        self,
        now: float,
        only: str | None = None,
        *,
        summary: bool = False,
        site: str | None = None,
        limit: int | None = None,
    ) -> Payload:
        """``rooms`` (one room with ``only``, the rooms of one ``site``, or all; without
        plots and events with ``summary``), ``sites`` (rooms per site), ``diagnostics``,
        and ``rooms_omitted``: at most ``limit`` rooms are given, the most recently valid
        ones (a flood of fake rooms cannot push live ones out of a snapshot, nor make it
        huge)."""
        chosen = [
            (k, r)
            for k, r in self.rooms.items()  # least recently valid first
            if (only is None or k == only) and (site is None or r.site == site)
        ]
        omitted = max(0, len(chosen) - limit) if limit is not None else 0
        rooms = {}
        for k, r in sorted(chosen[omitted:]):
            out = r.snapshot(now, summary=summary, age_out_s=self.age_out_s)
            out["rejected"] = dict(self.rejects.get(k, {}))
            rooms[k] = out
        sites: dict[str, int] = {}
        for r in self.rooms.values():
            sites[r.site] = sites.get(r.site, 0) + 1
        return {
            "rooms": rooms,
            "rooms_omitted": omitted,
            "sites": dict(sorted(sites.items())),
            "diagnostics": self.diagnostics(),
        }

    def diagnostics(self) -> Payload:
        by_reason: dict[str, int] = {}
        for counts in self.rejects.values():
            for reason, n in counts.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        # Rooms that never sent a valid message (so have no card) are listed here.
        elsewhere = {k: dict(v) for k, v in self.rejects.items() if k not in self.rooms}
        return {
            "accepted": self.accepted,
            "repeats": self.repeats,
            "ignored": self.ignored,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])[:50]),
            "rejected_without_room": dict(sorted(elsewhere.items())[:50]),
            "rooms": len(self.rooms),
            "bytes": self.bytes,
            "rooms_evicted": self.rooms_evicted,
            "rooms_removed": self.rooms_removed,
            "dropped_busy": self.dropped_busy,
            "limits": self.limits,
        }
