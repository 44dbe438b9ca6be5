"""The room's alarm ledger: every raising of an alarm, whether it still stands, and who
acknowledged it; what an ``ack`` command is judged against and what the retained ``alarms``
topic shows.

A pure object (no I/O, no clock): it is told what happened, from the tracker's events
while the daemon runs (:meth:`AlarmLedger.events`) and from the audit log's entries at
start (:meth:`AlarmLedger.entry`), through the same methods, so that the state rebuilt after
a restart is the state the run had. daemon/alarm_acks.py does the I/O around it.

One **raising** is one alarm key raised at one time (``raised_at``, the ``at`` the log and
the ``events`` topic carry for it); that pair is what an acknowledgement names. A raising
is *standing* until the tracker clears it, then *cleared*; either may be *acknowledged*
once. Rules:

* The tracker re-raises a standing key with another severity (an interlock becomes HIGH
  when the beam comes on): a new raising, to be acknowledged anew; the earlier one is
  ``superseded`` (an acknowledgement naming it is refused, saying which raising replaced it).
* A raising standing when the daemon stopped (nothing in the log cleared it) is *carried*:
  if the next run raises the same key with the same severity before anything cleared it,
  that is the same alarm continued (its ``raised_at`` and acknowledgement kept); a restart
  of the monitor does not make anyone acknowledge again what nobody saw end. A carried
  raising the next run does not raise again stays standing until the next delivery starts
  (the tracker clears everything then; the carried one is cleared at that time): unknown
  is shown, never dropped.
* The window: the raisings of the open (or last) delivery and of the one before it, with
  those of the room between them (``epoch`` counts the deliveries started). A raising older
  than that is forgotten, acknowledged or not; the log keeps it. At most
  :data:`MAX_RAISINGS` are kept: beyond, the oldest cleared ones go first (acknowledged
  ones before the others) and ``omitted`` counts the unacknowledged ones dropped.

The retained topic lists the standing raisings (acknowledged or not) and the cleared ones
not yet acknowledged, oldest first (:meth:`AlarmLedger.shown`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from iortd.auditlog.keyring import parse_utc
from iortd.daemon.tracker import AlarmCleared, AlarmRaised, DeliveryStarted, TrackerEvent
from iortd.kernel.timefmt import utc_ts

__all__ = [
    "MAX_COMMENT",
    "MAX_RAISINGS",
    "Ack",
    "AckRefused",
    "AckRequest",
    "AlarmLedger",
    "Raising",
    "parse_ack_body",
]

MAX_RAISINGS: Final = 256
MAX_COMMENT: Final = 200
MAX_KEY: Final = 80
_BODY_KEYS: Final = frozenset({"alarm_key", "raised_at", "delivery_id", "comment"})


class AckRefused(Exception):
    """An ``ack`` judged and refused; ``reason`` is a fixed word (docs/commands.md)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Ack:
    by: str  # the keyring holder id
    name: str  # the holder's printed name, from the keyring
    at: str  # when the acknowledgement was recorded (the entry's ts)
    comment: str | None = None


@dataclass(slots=True)
class Raising:
    key: str
    code: str
    severity: str
    message: str
    raised_at: str
    delivery_id: str | None
    epoch: int
    cleared_at: str | None = None
    ack: Ack | None = None
    carried: bool = False  # standing when a run of the daemon ended
    superseded_by: str | None = None  # the raised_at of the raising that replaced it

    @property
    def standing(self) -> bool:
        return self.cleared_at is None and self.superseded_by is None


@dataclass(frozen=True, slots=True)
class AckRequest:
    """An ``ack`` command's body, parsed."""

    alarm_key: str
    raised_at: str  # normalised: utc_ts of the parsed time
    delivery_id: str | None
    comment: str | None


def _printable(v: object, limit: int) -> bool:
    return isinstance(v, str) and 0 < len(v) <= limit and v.isprintable()


def parse_ack_body(body: Mapping[str, Any]) -> AckRequest:
    """The body of an ``ack`` command; AckRefused(``malformed_body``) names what is wrong."""
    extra = set(body) - _BODY_KEYS
    if extra:  # the key's name could be anything: not repeated
        raise AckRefused("malformed_body", f"{len(extra)} unknown key(s) in the body")
    key, raised, did = body.get("alarm_key"), body.get("raised_at"), body.get("delivery_id")
    comment = body.get("comment")
    if not _printable(key, MAX_KEY):
        raise AckRefused("malformed_body", f"alarm_key: the alarm's key (1-{MAX_KEY} chars)")
    try:
        at = utc_ts(parse_utc(raised))
    except ValueError:
        raise AckRefused("malformed_body", "raised_at: an RFC 3339 UTC time with Z") from None
    if "delivery_id" not in body or not (did is None or _printable(did, 64)):
        raise AckRefused("malformed_body", "delivery_id: the alarm's delivery id, or null")
    if comment is not None and not _printable(comment, MAX_COMMENT):
        raise AckRefused("malformed_body", f"comment: 1-{MAX_COMMENT} printable characters")
    return AckRequest(str(key), at, did, comment)


class AlarmLedger:
    """The raisings of the window (see the module doc), by (key, raised_at)."""

    def __init__(self) -> None:
        self._raisings: dict[tuple[str, str], Raising] = {}
        self._standing: dict[str, Raising] = {}
        self.epoch = 0
        self.omitted = 0  # unacknowledged raisings dropped by the cap, this window
        self.version = 0  # bumped on every change of what :meth:`shown` returns

    # ---- what happened ----------------------------------------------------------------------

    def raised(
        self,
        key: str,
        code: str,
        severity: str,
        message: str,
        at: str,
        delivery_id: str | None,
    ) -> None:
        current = self._standing.get(key)
        if current is not None and current.carried and current.severity == severity:
            current.carried = False  # the same alarm, continued across a restart
            return
        if current is not None:
            current.superseded_by = at
        r = Raising(key, code, severity, message, at, delivery_id, self.epoch)
        self._raisings[(key, at)] = r
        self._standing[key] = r
        self._cap()
        self.version += 1

    def cleared(self, key: str, at: str) -> None:
        r = self._standing.pop(key, None)
        if r is not None:
            r.cleared_at = at
            self.version += 1

    def delivery_started(self, at: str) -> None:
        """A delivery starts: the tracker clears what it had standing (its own events say
        so); a raising carried from an earlier run, which this run's tracker never had, is
        cleared here, at the same time."""
        for key, r in list(self._standing.items()):
            if r.carried:
                r.cleared_at = at
                del self._standing[key]
                self.version += 1
        self.epoch += 1
        old = [k for k, r in self._raisings.items() if r.epoch < self.epoch - 1]
        for k in old:
            r = self._raisings.pop(k)
            if self._standing.get(r.key) is r:
                del self._standing[r.key]
        if old:
            self.omitted = 0
            self.version += 1

    def run_ended(self) -> None:
        """A run of the daemon ended here (a ``daemon_start`` follows in the log, or the
        log ends): what stands is carried."""
        for r in self._standing.values():
            r.carried = True

    def acknowledged(self, key: str, raised_at: str, ack: Ack) -> None:
        r = self._raisings.get((key, raised_at))
        if r is not None and r.ack is None:
            r.ack = ack
            self.version += 1

    def events(self, events: Sequence[TrackerEvent]) -> None:
        """The tracker's events, in order."""
        for ev in events:
            if isinstance(ev, AlarmRaised):
                a = ev.alarm
                self.raised(
                    a.key,
                    str(a.code),
                    str(a.severity),
                    a.message,
                    utc_ts(a.raised_utc),
                    ev.delivery_id,
                )
            elif isinstance(ev, AlarmCleared):
                self.cleared(ev.alarm.key, utc_ts(ev.utc))
            elif isinstance(ev, DeliveryStarted):
                self.delivery_started(utc_ts(ev.utc))

    def entry(self, e: Mapping[str, Any]) -> bool:
        """One audit-log entry (parsed), replayed; True when it was one of ours. Raises
        KeyError/TypeError/ValueError on a malformed one (the caller skips it)."""
        kind, d = e["type"], e["data"]
        if kind == "alarm_raised":
            at = utc_ts(parse_utc(d["at"]))
            did = e.get("delivery_id")
            self.raised(d["key"], d["code"], d["severity"], d["message"], at, did)
        elif kind == "alarm_cleared":
            self.cleared(str(d["key"]), utc_ts(parse_utc(d["at"])))
        elif kind == "delivery_started":
            self.delivery_started(utc_ts(parse_utc(d.get("at") or e["ts"])))
        elif kind == "daemon_start":
            self.run_ended()
        elif kind == "alarm_acknowledged":
            ack = Ack(str(d["by"]), str(d["name"]), str(e["ts"]), d.get("comment"))
            self.acknowledged(str(d["key"]), utc_ts(parse_utc(d["raised_at"])), ack)
        else:
            return False
        return True

    # ---- judging ----------------------------------------------------------------------------

    def judge(self, req: AckRequest) -> Raising:
        """The raising ``req`` acknowledges; AckRefused when it cannot be acknowledged."""
        r = self._raisings.get((req.alarm_key, req.raised_at))
        if r is None:
            others = sorted(at for (k, at) in self._raisings if k == req.alarm_key)
            known = f"; raised at {', '.join(others[-3:])}" if others else ""
            raise AckRefused(
                "unknown_alarm",
                f"no raising of {req.alarm_key!r} at {req.raised_at} in this room's current "
                f"alarms{known}",
            )
        if r.superseded_by is not None:
            raise AckRefused(
                "superseded",
                f"{r.key} was raised again at {r.superseded_by} ({self._raisings_sev(r)}): "
                "acknowledge that raising",
            )
        if r.ack is not None:
            raise AckRefused(
                "already_acknowledged", f"{r.key} acknowledged by {r.ack.by} at {r.ack.at}"
            )
        if req.delivery_id != r.delivery_id:
            raise AckRefused(
                "wrong_delivery",
                f"{r.key} raised at {r.raised_at} belongs to delivery {r.delivery_id}, "
                f"not {req.delivery_id}",
            )
        return r

    def _raisings_sev(self, r: Raising) -> str:
        new = self._raisings.get((r.key, r.superseded_by or ""))
        return "severity " + (new.severity if new is not None else "unknown")

    # ---- what is shown ----------------------------------------------------------------------

    def shown(self) -> list[Raising]:
        """Standing raisings and cleared unacknowledged ones, oldest first."""
        out = [
            r
            for r in self._raisings.values()
            if r.standing or (r.superseded_by is None and r.ack is None)
        ]
        return sorted(out, key=lambda r: (r.raised_at, r.key))

    def _cap(self) -> None:
        excess = len(self._raisings) - MAX_RAISINGS
        if excess <= 0:
            return
        gone = sorted(
            (r for r in self._raisings.values() if not r.standing),
            key=lambda r: (r.ack is None, r.raised_at),
        )[:excess]
        for r in gone:
            del self._raisings[(r.key, r.raised_at)]
            if r.ack is None and r.superseded_by is None:
                self.omitted += 1

    def view(self) -> list[dict[str, Any]]:
        """:meth:`shown` as the ``alarms`` topic's items (daemon/mqtt/payloads.py)."""
        return [
            {
                "key": r.key,
                "code": r.code,
                "severity": r.severity,
                "message": r.message,
                "raised_at": r.raised_at,
                "cleared_at": r.cleared_at,
                "delivery_id": r.delivery_id,
                "acknowledged": None
                if r.ack is None
                else {"by": r.ack.by, "name": r.ack.name, "at": r.ack.at},
            }
            for r in self.shown()
        ]
