"""What the dashboard knows: built only from MQTT messages that pass every check, bounded
in bytes, no I/O.

Per room (``{site}/{room}`` under ``{prefix}/v1/``) it keeps a
:class:`~iortd.dashboard.room.Room` (the retained topics, the live telemetry, a thinned
plot history, the applicator reader's latest message and displacement trace, recent
events and the ``seq`` bookkeeping; :mod:`iortd.dashboard.room` says what each holds).
This module is the gate in front of the rooms and their common budget.

**Hostile input** (issue 13). Anyone with publish rights under ``{prefix}/v1/`` can send
anything; one message must never freeze, pin or hide a room. So a message is applied only
when all of these hold, and is otherwise rejected with a short reason, counted per room
and reason (shown in the snapshot's ``rejected`` and ``diagnostics``) and never shown:

1. the topic is ``{prefix}/v1/{site}/{room}/{name}`` with a known name, and site and room
   are slugs as a daemon's config requires (so no look-alike of a real room's name);
2. the payload is at most ``max_payload_bytes``, checked *before* parsing;
3. it is JSON (orjson: no NaN/Infinity, integers within 64 bits, nesting bounded);
4. it validates against the published schema of its topic (`iortd.dashboard.schemas`), a
   ``status`` names the room of its topic, and a ``delivery``'s ``verification`` does not
   contradict itself and names its prescription by pseudonyms only
   (`iortd.dashboard.room.verification_error`: never a green VERIFIED over a list of
   failed items), and an ``alarms`` list holds each raising once and only printable
   names (`iortd.dashboard.alarms.alarm_error`);
5. its ``seq`` and ``session`` are at most 2^53 (the schema allows 64 bits, but no daemon
   gets there and a browser cannot represent more), and ``seq`` is not a jump of more
   than ``seq_window`` past the highest handled in its topic and session (a forged
   ``2^64-1`` would otherwise hide every later genuine message, rule 1 read naively).

A ``status`` with ``online: false`` whose ``(session, seq)`` is below the held status's is
a will that came late (daemon/mqtt/birth.py): it is ignored (counted as
``stale_will_ignored``), so a late will never marks a newer session offline. Only an
offline message is judged so. What this cannot stop: whoever may publish on the room's
``status`` (the room's own broker account, or the site's bridge; the generated ACLs give
nobody else that right) can publish an online status with a higher ``session``, after
which the real will is ignored as late, or an offline one that the daemon will not
overwrite (it republishes its birth only over an OLDER session). Either lasts until the
daemon's next connection; the telemetry's own staleness still shows a silent room.

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
the wire; a room holds at most seven payloads, ``events_bytes`` of events,
``history_points`` plot points and as many trace points, and ``SEQ_KEYS`` x ``RECENT``
remembered seqs (charged as measured: a publisher cycling sessions otherwise made a room
hold ~650 KB charged under 1 KB); all rooms together at most ``max_bytes``, beyond which
the room that has gone longest without a valid message is evicted (counted); besides, the
items of ``alarms`` lists already found valid are remembered, at most 2 MiB for all rooms
(`iortd.dashboard.alarms.CheckedItems`). There is no cap on the
number of rooms, so retained rooms that publish nothing can never keep a live one out.
**Ageing**: a room with no valid message for ``age_out_s`` is marked ``aged_out`` in the
snapshot; after twice that, `Rooms.sweep` removes it (counted).

Receipt times are the dashboard's monotonic clock; a snapshot gives each one as an age, so
that a browser computes staleness with its own clock whatever the skew between machines.
A restart of the dashboard forgets all of it and rebuilds from the retained topics.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from iortd.dashboard.alarms import CheckedItems, alarm_error
from iortd.dashboard.links import LinkRejected, SiteLinks
from iortd.dashboard.room import (
    EVENTS_BYTES,
    RETAINED,
    Rejected,
    Room,
    Verdict,
    all_finite,
    check_envelope,
    epoch_ms,
    point_of,
    verification_error,
)
from iortd.dashboard.schemas import schema_error

__all__ = [
    "EVENTS_BYTES",
    "RETAINED",
    "Accepted",
    "Rejected",
    "Room",
    "Rooms",
    "parse_topic",
    "point_of",
]

STREAMS = ("telemetry", "applicator", "events", "skip")
NAMES = RETAINED + STREAMS
# Topics of the contract (ARCHITECTURE: the signed commands in) that the dashboard does
# not show: passed over, counted as ``ignored``, never as invalid, so that a room's card
# does not report its own commands as rejected. (``alarms`` was one until issue 19.)
NOT_SHOWN: tuple[str, ...] = ()
NOT_SHOWN_PREFIX = "cmd/"
# A site or room level: the daemon's slug (its config and the status schema: a-z, 0-9, '-',
# at most 63). Anything else no daemon can publish, and would let a look-alike of a real
# room ("or-1" spelt with a bidi override, a zero-width space, a non-ASCII hyphen) show a
# card under that room's name.
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

# Defaults, also the CLI's (docs/dashboard.md, "What it holds").
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_BYTES = 256 * 1024 * 1024
SEQ_WINDOW = 1 << 24  # ~9.7 days of 20 Hz telemetry missed, still a gap, not a jump
FUTURE_S = 3600.0  # a ts further ahead of the dashboard's clock is refused
AGE_OUT_S = 86400.0  # a day: a running daemon publishes every sample, so only dead ones age
PLAUSIBLE = 2**53  # the largest seq or session believed (JavaScript's exact integers)
REJECT_ROOMS = 1024  # rooms (or would-be rooms) with reject counters
REASONS_PER_ROOM = 32
NO_ROOM = "(no room)"
OTHER = "(other)"

Payload = dict[str, Any]


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
        # Each site's link to the central broker (dashboard/links.py): not a room.
        self.links = SiteLinks(prefix)
        self._alarm_items = CheckedItems()  # alarm items already found valid (bounded)
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
        # Messages by topic kind (topic_kind: a name of the contract, "cmd" or "other"),
        # for the dashboard's /metrics: every one that arrived, and every one rejected.
        self.received_by_kind: Counter[str] = Counter()
        self.rejected_by_kind: Counter[str] = Counter()

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
        if self.links.handles(topic):
            try:
                self.links.receive(topic, data, wall=wall, retained=retained)
            except LinkRejected as err:
                exc = Rejected(err.reason, f"{err.reason}: topic {topic[:200]!r}")
                self._count(exc, NO_ROOM, topic)
                raise exc from None
            return None
        if len(data) > self.max_payload_bytes:
            exc = Rejected(
                "payload too large",
                f"payload of {len(data)} bytes is too large (limit {self.max_payload_bytes})",
            )
            self._count(exc, self.room_of(topic), topic)
            raise exc
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            exc = Rejected("not JSON", f"not JSON: {str(err)[:120]}")
            self._count(exc, self.room_of(topic), topic)
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
            self._count(exc, exc.room or self.room_of(topic), topic)
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
        reason = self._alarm_items.schema_error(p) if name == "alarms" else schema_error(name, p)
        if reason is not None:
            raise Rejected(reason, room=key)
        if p["seq"] > PLAUSIBLE or p["session"] > PLAUSIBLE:
            # The schema allows 64 bits; no daemon gets past 2^53 (285,000 years at 1 kHz)
            # and a browser cannot even represent it: a forgery, whatever else it says.
            raise Rejected("seq/session beyond 2^53", room=key)
        if not all_finite(p):
            # JSON has no infinity, but 1e999 parses to one and the schema's "number"
            # takes it; the daemon never sends it (it writes "inf").
            raise Rejected("number out of range", room=key)
        if name == "status" and (p["site"], p["room"]) != (site, room_name):
            raise Rejected("status names another room", room=key)
        if name == "delivery" and (why := verification_error(p)) is not None:
            raise Rejected(*why, room=key)
        if name == "alarms" and (why := alarm_error(p)) is not None:
            raise Rejected(*why, room=key)
        if name == "skip" and p["skipped"]["first"] > p["skipped"]["last"]:
            raise Rejected("skip: first > last", room=key)  # what the schema cannot say
        ts = epoch_ms(p["ts"])
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
        if name == "status" and room.stale_will(p):
            # A will of an earlier connection or session, arriving after the newer birth
            # (a half-open connection the broker dropped late): the room is not offline.
            room.note("stale_will_ignored")
            return None
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
        self._count(exc, exc.room or self.room_of(topic), topic)

    def arrived(self, topic: str) -> None:
        """Count a message as it arrives from the broker (before anything else)."""
        self.received_by_kind[self.topic_kind(topic)] += 1

    def topic_kind(self, topic: str) -> str:
        """A topic's name in the contract (``status``, ``telemetry``, ...), ``cmd`` for a
        command, else ``other``: a bounded label, whatever a publisher sends."""
        head = f"{self.prefix}/v1/"
        parts = topic[len(head) :].split("/", 2) if topic.startswith(head) else []
        if len(parts) != 3:
            return "other"
        name = parts[2]
        if name.startswith(NOT_SHOWN_PREFIX):
            return "cmd"
        return name if name in NAMES or name in NOT_SHOWN else "other"

    def _count(self, exc: Rejected, room: str, topic: str) -> None:
        self.rejected += 1
        self.rejected_by_kind[self.topic_kind(topic)] += 1
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
            "links": self.links.out(),
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
