"""The MQTT sink's retained state topics: ``interlocks``, ``delivery``, ``alarms``,
``audit/checkpoint``.

:class:`RetainedState` keeps the latest state of each (a cell: how to build its payload,
which version the broker has) and publishes what changed through the function the sink's
connection gives it; it holds no connection and no task of its own.

* Rate limits: ``delivery`` at most once per second while only the dose moves (at once on
  any event), ``interlocks`` on change, ``alarms`` on change but at most once per
  :data:`ALARMS_MIN_INTERVAL_S` (a flapping alarm coalesces). A state superseded before
  the broker had it is acknowledged in the outbox unsent: only the newest goes out.
* ``delivery.record``: what a sign-off of the ended delivery signs (daemon/signoff.py sets
  it through :meth:`RetainedState.delivery_record` once a signed checkpoint covers the
  delivery); kept for the latest delivery only, added to its next payload at once.
* On every (re)connect (:meth:`RetainedState.reconnected`) the state the broker already
  had is published again (the broker may have lost it in a restart), at once.

The retained ``audit/checkpoint`` is the off-host copy auditors verify against, so it is
never overwritten by a log that is behind it. On every connection the sink subscribes to
its own checkpoint topic and this object holds its checkpoint back (up to
:data:`RETAINED_WAIT_S`) until the broker's retained one has been seen
(:meth:`RetainedState.retained_checkpoint`). One signed by this daemon's key is handed to
``checkpoint_guard`` (the daemon, which has the log): if the log does not contain it — it
covers more entries than the log, or the log's entry at its size has another hash — this
log is a fork (a restored backup, a replaced log), and no checkpoint is published again in
this run (the daemon raises the alarm and records it). A retained note not signed by our
key is ignored (anyone with publish rights could put one there) and is replaced.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from iortd.auditlog.note import Checkpoint, Verifier
from iortd.daemon.mqtt.outbox import Outbox, Record
from iortd.daemon.mqtt.payloads import (
    Envelope,
    Payload,
    alarms_payload,
    checkpoint_payload,
    delivery_payload,
    interlocks_payload,
)
from iortd.daemon.tracker import DeliverySnapshot, InterlockChanged, TrackerEvent
from iortd.kernel.types import Interlock, InterlockState

__all__ = [
    "ALARMS_MIN_INTERVAL_S",
    "DELIVERY_MIN_INTERVAL_S",
    "RETAINED_WAIT_S",
    "STATE_TOPICS",
    "RetainedState",
]

log = structlog.get_logger("iortd.mqtt")

DELIVERY_MIN_INTERVAL_S = 1.0
ALARMS_MIN_INTERVAL_S = 0.25
STATE_TOPICS = ("interlocks", "delivery", "alarms", "audit/checkpoint")
RETAINED_WAIT_S = 1.0  # how long a connection holds our checkpoint for the broker's

Send = Callable[[Record], Awaitable[None]]


@dataclass(slots=True)
class _Cell:
    """The latest state of one retained topic, and what of it the broker has."""

    name: str
    build: Callable[[Envelope], Payload] | None = None
    ts: str = ""
    version: int = 0
    record: Record | None = None  # the message for ``record_version`` (sent or in flight)
    record_version: int = -1
    sent: bool = False  # the broker acknowledged ``record``
    not_before: float = 0.0  # monotonic seconds (rate limit)

    @property
    def dirty(self) -> bool:
        return self.build is not None and (self.record_version != self.version or not self.sent)


class RetainedState:
    """The retained state topics of one sink (see the module doc). ``now`` gives the
    timestamp of a state when it is set; ``simulated`` marks the envelopes."""

    def __init__(
        self, *, now: Callable[[], str], simulated: bool, verifier: Verifier | None
    ) -> None:
        self.verifier = verifier  # whose retained checkpoints count (see the module doc)
        # Set by the daemon: why the log does not contain this checkpoint, or None.
        self.checkpoint_guard: Callable[[Checkpoint], Awaitable[str | None]] | None = None
        self._now = now
        self._sim = simulated
        self._cells = {n: _Cell(n) for n in STATE_TOPICS}
        self._snap: DeliverySnapshot | None = None  # the latest delivery, for its record
        self._record: tuple[str, Mapping[str, Any]] | None = None
        self._interlocks: dict[Interlock, InterlockState] = dict.fromkeys(
            Interlock, InterlockState.UNKNOWN
        )
        self._all_clear = False
        self._cp_blocked = False
        self._last_note: str | None = None  # ours: its echo needs no check
        self._cp_note: str | None = None  # the latest checkpoint, and its cosignatures
        self._cp_lines: list[str] = []

    # ---- what changes the state ---------------------------------------------------------

    def reading(
        self,
        interlocks: Mapping[Interlock, InterlockState],
        all_clear: bool,
        delivery: DeliverySnapshot | None,
    ) -> None:
        """A reading: its interlocks (on change) and the delivery (at the rate limit)."""
        merged = {**self._interlocks, **interlocks}
        if merged != self._interlocks or all_clear != self._all_clear:
            self._interlocks, self._all_clear = merged, all_clear
            self._set_interlocks()
        if delivery is not None:
            self._set_delivery(delivery, urgent=False)

    def events(self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None) -> None:
        changed = False
        for ev in events:
            if isinstance(ev, InterlockChanged) and self._interlocks.get(ev.interlock) != ev.new:
                self._interlocks[ev.interlock] = ev.new
                changed = True
        if changed:
            self._all_clear = all(s is InterlockState.OK for s in self._interlocks.values())
            self._set_interlocks()
        if delivery is not None:
            # Any event can change the delivery summary (a gap, a lost link, the end):
            # send it now, not at the rate limit, also when no reading came with it.
            self._set_delivery(delivery, urgent=True)

    def alarms(self, items: Sequence[Mapping[str, object]], omitted: int) -> None:
        """The alarm ledger's items (daemon/alarm_ledger.py), republished on change."""
        frozen = [dict(i) for i in items]
        self._set("alarms", lambda env: alarms_payload(env, frozen, omitted))

    def checkpoint(self, note: str) -> None:
        self._last_note = self._cp_note = note
        self._cp_lines = []
        self._set("audit/checkpoint", lambda env: checkpoint_payload(env, note))

    def cosigned(self, note: str, line: str) -> None:
        """A witness's cosignature of ``note`` (verified and recorded by the daemon): the
        retained checkpoint again, with it appended, if ``note`` is still the latest."""
        if note != self._cp_note or line in self._cp_lines:
            return  # a newer checkpoint is out (its own cosignatures will follow)
        self._cp_lines.append(line)
        lines = tuple(self._cp_lines)
        self._last_note = note + "".join(c.rstrip("\n") + "\n" for c in lines)
        self._set("audit/checkpoint", lambda env: checkpoint_payload(env, note, lines))

    async def retained_checkpoint(self, payload: bytes) -> bool:
        """A message on our checkpoint topic (the retained one at subscription, or our
        own coming back): if our key signed it, the log must contain it. True when our
        checkpoint may go out now (wake the publisher)."""
        try:
            note = orjson.loads(payload)["note"]
            if note == self._last_note:  # our own coming back: nothing to check
                if not self._cp_blocked:
                    self._cells["audit/checkpoint"].not_before = 0.0
                return False
            cp, signed = Checkpoint.parse_verified(str(note), self.verifier)
        except (ValueError, KeyError, TypeError):
            log.warning("mqtt_retained_checkpoint_unreadable")
            return False
        if not signed:
            log.warning("mqtt_retained_checkpoint_not_ours", origin=cp.origin, count=cp.count)
            return False
        guard = self.checkpoint_guard
        why = None if guard is None else await guard(cp)
        if why is not None and not self._cp_blocked:
            self._cp_blocked = True
            log.critical("mqtt_checkpoint_not_published", reason=why, broker_count=cp.count)
        if not self._cp_blocked:
            self._cells["audit/checkpoint"].not_before = 0.0  # seen: ours may go out now
            return True
        return False

    def _set_interlocks(self) -> None:
        states, clear = dict(self._interlocks), self._all_clear
        self._set("interlocks", lambda env: interlocks_payload(env, states, clear))

    def delivery_record(self, delivery_id: str, record: Mapping[str, Any]) -> None:
        """What a sign-off of ``delivery_id`` signs, on its ``delivery`` payload from now."""
        self._record = (delivery_id, dict(record))
        if self._snap is not None and self._snap.delivery_id == delivery_id:
            self._set_delivery(self._snap, urgent=True)

    def _set_delivery(self, snap: DeliverySnapshot, *, urgent: bool) -> None:
        self._snap = snap
        got = self._record
        rec = got[1] if got is not None and got[0] == snap.delivery_id else None
        self._set("delivery", lambda env: delivery_payload(env, snap, rec))
        if urgent:
            self._cells["delivery"].not_before = 0.0

    def _set(self, name: str, build: Callable[[Envelope], Payload]) -> None:
        cell = self._cells[name]
        cell.build, cell.ts = build, self._now()
        cell.version += 1

    # ---- what goes out ------------------------------------------------------------------

    def next_due(self, now: float) -> float | None:
        """Seconds until the next unsent state may go out (0 if one may now), or None."""
        due = [c.not_before - now for c in self._cells.values() if c.dirty]
        return max(0.0, min(due)) if due else None

    async def reconnected(self, send: Send) -> None:
        """A new connection: what the broker had goes again (it may have lost it in a
        restart), the current state now rather than at the rate limit; our checkpoint is
        held until the broker's retained one is seen (or the wait is over)."""
        for cell in self._cells.values():
            cell.not_before = 0.0
            if cell.name == "audit/checkpoint":
                cell.not_before = time.monotonic() + RETAINED_WAIT_S
                cell.sent = False
                continue
            if cell.record is not None and cell.sent and not cell.dirty:
                await send(cell.record)

    async def publish(self, outbox: Outbox, send: Send, *, closing: Callable[[], bool]) -> None:
        """Send each state that changed and is due (each one, due or not, once ``closing()``)."""
        now = time.monotonic()
        for cell in self._cells.values():
            if not cell.dirty or (cell.not_before > now and not closing()):
                continue
            if cell.name == "audit/checkpoint" and self._cp_blocked:
                continue
            if cell.record_version != cell.version and cell.build is not None:
                env = Envelope(outbox.next_seq(cell.name), outbox.session, cell.ts, sim=self._sim)
                if cell.record is not None and not cell.sent:
                    outbox.ack(cell.record)  # superseded before the broker had it
                cell.record = outbox.add(cell.name, cell.build(env))
                cell.record_version, cell.sent = cell.version, False
            if cell.record is None:
                continue
            await outbox.wait_publishable(cell.record)
            await send(cell.record)
            outbox.ack(cell.record)
            cell.sent = True
            if cell.name == "delivery":
                cell.not_before = now + DELIVERY_MIN_INTERVAL_S
            elif cell.name == "alarms":
                cell.not_before = now + ALARMS_MIN_INTERVAL_S
