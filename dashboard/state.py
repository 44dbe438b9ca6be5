"""What the dashboard knows: built only from MQTT messages, bounded, no I/O.

Per room (``{site}/{room}`` under ``{prefix}/v1/``) it keeps:

* the latest message of each retained topic (``status``, ``interlocks``, ``delivery``,
  ``audit/checkpoint``), as the broker hands them to any new subscriber;
* the latest *live* ``telemetry`` (the current readings; a replayed sample is never the
  current state, docs/mqtt-topics.md rule 2) and when it arrived;
* a recent history of one delivery's telemetry for the plots, at most ``history_points``
  points: when full, every second point is dropped (the whole delivery stays in view at a
  coarser step);
* the last ``events_kept`` messages of ``events`` (alarms, notices, phase changes);
* per topic and ``session``, the highest ``seq`` handled, to drop repeats (rule 1).

Receipt times are the dashboard's monotonic clock; a snapshot gives each one as an age, so
that a browser computes staleness with its own clock whatever the skew between machines.
A restart of the dashboard forgets all of it and rebuilds from the retained topics.
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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
_SLUG = re.compile(r"^[^/+#\x00]+$")

Payload = dict[str, Any]


class Rejected(ValueError):
    """A message that is not a v1 message of a known topic; the text says why."""


def parse_topic(prefix: str, topic: str) -> tuple[str, str, str]:
    """``(site, room, name)`` of ``{prefix}/v1/{site}/{room}/{name}``."""
    head = f"{prefix}/v1/"
    if not topic.startswith(head):
        raise Rejected(f"topic {topic!r} is not under {head}")
    parts = topic[len(head) :].split("/", 2)
    if len(parts) != 3 or not all(_SLUG.match(p) for p in parts[:2]):
        raise Rejected(f"topic {topic!r}: expected {head}SITE/ROOM/NAME")
    site, room, name = parts
    if name not in NAMES:
        raise Rejected(f"topic {topic!r}: unknown name {name!r}")
    return site, room, name


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_envelope(payload: object) -> Payload:
    """The payload if it carries a v1 envelope; :class:`Rejected` otherwise. Only the
    envelope is checked: the browser shows fields it knows and ignores the rest."""
    if not isinstance(payload, dict):
        raise Rejected("payload is not a JSON object")
    if payload.get("schema") != SCHEMA:
        raise Rejected(f"schema {payload.get('schema')!r} is not {SCHEMA!r}")
    session, seq = payload.get("session"), payload.get("seq")
    if not (isinstance(session, int) and _is_int(session) and session >= 1) or not (
        isinstance(seq, int) and _is_int(seq) and seq >= 0
    ):
        raise Rejected(f"session {session!r} / seq {seq!r}: expected integers")
    if not isinstance(payload.get("ts"), str):
        raise Rejected("ts is missing")
    if not isinstance(payload.get("sim"), bool) or not isinstance(payload.get("historical"), bool):
        raise Rejected("sim / historical must be booleans")
    return payload


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

    def out(self, now: float) -> Payload:
        return {"payload": self.payload, "age_ms": round((now - self.mono) * 1000)}


@dataclass
class Room:
    site: str
    room: str
    history_points: int
    events_kept: int
    retained: dict[str, Held] = field(default_factory=dict)
    telemetry: Held | None = None
    history_delivery: str | None = None
    history: list[Payload] = field(default_factory=list)
    events: deque[Held] = field(init=False)
    _seen: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events = deque(maxlen=self.events_kept)

    @property
    def key(self) -> str:
        return f"{self.site}/{self.room}"

    def seen_before(self, name: str, payload: Payload) -> bool:
        """Rule 1: within a session ``seq`` only grows, so a (session, seq) at or below
        the highest handled for that topic is a repeat."""
        k = (name, int(payload["session"]))
        seq = int(payload["seq"])
        last = self._seen.get(k)
        if last is not None and seq <= last:
            return True
        self._seen[k] = seq
        if len(self._seen) > 64:  # bound: old sessions are forgotten, oldest first
            for old in list(self._seen)[:16]:
                del self._seen[old]
        return False

    def apply(self, name: str, payload: Payload, mono: float) -> None:
        held = Held(payload, mono)
        if name in RETAINED:
            self.retained[name] = held
        elif name == "events":
            self.events.append(held)
        else:
            if not payload["historical"]:
                self.telemetry = held
            self._add_point(payload)

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

    def snapshot(self, now: float) -> Payload:
        return {
            "site": self.site,
            "room": self.room,
            "retained": {n: h.out(now) for n, h in self.retained.items()},
            "telemetry": None if self.telemetry is None else self.telemetry.out(now),
            "history_delivery": self.history_delivery,
            "history": list(self.history),
            "events": [h.out(now) for h in self.events],
        }


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


class Rooms:
    """Every room seen under ``{prefix}/v1/``; at most ``max_rooms`` of them."""

    def __init__(
        self,
        prefix: str,
        *,
        history_points: int = 4000,
        events_kept: int = 200,
        max_rooms: int = 64,
    ) -> None:
        self.prefix = prefix
        self.history_points = history_points
        self.events_kept = events_kept
        self.max_rooms = max_rooms
        self.rooms: dict[str, Room] = {}
        self.repeats = 0

    def accept(self, topic: str, payload: object, mono: float) -> Accepted | None:
        """Apply one message. None for a repeat; :class:`Rejected` if it is not v1."""
        site, room_name, name = parse_topic(self.prefix, topic)
        p = check_envelope(payload)
        key = f"{site}/{room_name}"
        room = self.rooms.get(key)
        if room is None:
            if len(self.rooms) >= self.max_rooms:
                raise Rejected(f"more than {self.max_rooms} rooms: {key} ignored")
            room = self.rooms[key] = Room(site, room_name, self.history_points, self.events_kept)
        if room.seen_before(name, p):
            self.repeats += 1
            return None
        room.apply(name, p, mono)
        return Accepted(room, name, p)

    def snapshot(self, now: float, only: str | None = None) -> dict[str, Payload]:
        return {
            k: r.snapshot(now) for k, r in sorted(self.rooms.items()) if only is None or k == only
        }
