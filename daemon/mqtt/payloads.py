"""Topic schema v1: topic names and the JSON payload of every message, as pure functions.

No I/O, no clock reads and no broker here: the caller supplies each message's envelope
(``seq`` per topic, ``session``, ``ts``) and the data; the functions return plain dicts
ready for JSON (str, int, float, bool, None, list, dict only). docs/mqtt-topics.md documents
the topics and docs/schemas/v1/*.schema.json validate what these functions return; change
the three together.

Data is mapped the way the audit log maps it (daemon/entries.py): the same helpers,
so a delivery looks the same in the record and on the wire. Non-finite readings are sent
as the text ``"nan"``, ``"inf"`` or ``"-inf"`` (JSON has no NaN), never silently as null.
Nothing here carries patient-identifying data: delivery ids are pseudonymous codes and
readings hold none.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from iortd.auditlog.note import Checkpoint
from iortd.daemon.entries import EVENT_TYPES, event_entry, num, summary_data
from iortd.daemon.sinks import ApplicatorSample, Sample
from iortd.daemon.tracker import (
    DeliveryAmended,
    DeliverySnapshot,
    Terminated,
    TrackerEvent,
    VerificationChecked,
)
from iortd.kernel.timefmt import utc_ts
from iortd.kernel.types import ApplicatorIdentity, Interlock, InterlockState

__all__ = [
    "APPLICATOR_BOUNDS",
    "EVENTS_TOPIC_KINDS",
    "EVENT_KINDS",
    "NOTICE_KIND",
    "REPORT_FIELDS",
    "SCHEMA",
    "SKIPPABLE_TOPICS",
    "SKIP_REASONS",
    "TOPICS",
    "Envelope",
    "Payload",
    "TopicSpec",
    "alarms_payload",
    "applicator_payload",
    "checkpoint_payload",
    "delivery_payload",
    "event_payloads",
    "interlocks_payload",
    "notice_payload",
    "report_payload",
    "skip_payload",
    "status_payload",
    "telemetry_payload",
    "topic",
]

SCHEMA = "iort/v1"
VERSION = "v1"
SEQ_MAX = 2**64 - 1  # seq is a 64-bit unsigned counter that never wraps
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
# The same kinds, in the same words, as the audit log's event entries.
EVENT_KINDS: tuple[str, ...] = EVENT_TYPES
# Besides the tracker's events, the events topic carries the daemon's notices that cannot
# wait for the record (the audit log itself failing): not in the log, by their nature.
NOTICE_KIND = "daemon_notice"
NOTICE_SEVERITIES = ("critical", "info")
# What ``events`` shows of a sink's entry (daemon/sink_records.py), by kind: these fields of
# the entry's data, as recorded (docs/schemas/v1/events.schema.json). Never patient data.
REPORT_FIELDS: dict[str, tuple[str, ...]] = {
    "dicom_handoff": (
        "destination",
        "what",
        "sop_instance_uid",
        "outcome",
        "status",
        "detail",
        "attempt",
    ),
}
EVENTS_TOPIC_KINDS: tuple[str, ...] = (*EVENT_KINDS, NOTICE_KIND, *REPORT_FIELDS)

Payload = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    qos: int
    retain: bool


# State topics are retained (a new subscriber gets the latest at once); streams are not.
TOPICS: Mapping[str, TopicSpec] = MappingProxyType(
    {
        "status": TopicSpec(qos=1, retain=True),
        "telemetry": TopicSpec(qos=1, retain=False),
        "applicator": TopicSpec(qos=1, retain=False),
        "interlocks": TopicSpec(qos=1, retain=True),
        "delivery": TopicSpec(qos=1, retain=True),
        "events": TopicSpec(qos=1, retain=False),
        "audit/checkpoint": TopicSpec(qos=1, retain=True),
        "alarms": TopicSpec(qos=1, retain=True),
        # Declared seq skips of the streams (skip_payload): a stream itself.
        "skip": TopicSpec(qos=1, retain=False),
    }
)
# The streams whose seqs a skip can declare (never ``skip`` itself: a skip is never
# skipped), and why they were skipped (docs/mqtt-topics.md, "Declared skips").
SKIPPABLE_TOPICS = ("telemetry", "applicator", "events")
SKIP_REASONS = ("unpublished", "not_held", "thinned")

_BAD_SEGMENT = re.compile(r"[/+#\x00]")


def topic(prefix: str, site: str, room: str, name: str) -> str:
    """``{prefix}/v1/{site}/{room}/{name}`` for one of the v1 topic names."""
    if name not in TOPICS:
        raise ValueError(f"unknown topic name {name!r}: expected one of {', '.join(TOPICS)}")
    for what, value in (("prefix", prefix), ("site", site), ("room", room)):
        if not value or _BAD_SEGMENT.search(value):
            raise ValueError(
                f"topic {what} {value!r}: must be non-empty, without '/', '+', '#' or NUL"
            )
    return f"{prefix}/{VERSION}/{site}/{room}/{name}"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every message carries besides its data.

    ``seq`` counts per topic from 0 and never wraps or repeats across restarts (the caller
    persists it); ``session`` increments at each daemon start (from 1); ``ts`` is when the
    message was made (UTC, RFC 3339, microseconds, ``Z``); ``sim`` is true when any of its
    data came from a simulator; ``historical`` is true on replays of what the broker missed.
    """

    seq: int
    session: int
    ts: str
    sim: bool = False
    historical: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.seq) or not 0 <= self.seq <= SEQ_MAX:
            raise ValueError(f"seq {self.seq!r}: must be an integer in 0..2**64-1")
        if not _is_int(self.session) or not 1 <= self.session <= SEQ_MAX:
            raise ValueError(f"session {self.session!r}: must be an integer in 1..2**64-1")
        bad_ts = f"ts {self.ts!r}: expected UTC like 2026-11-26T10:00:00.123456Z"
        if not isinstance(self.ts, str) or not TS_RE.fullmatch(self.ts):
            raise ValueError(bad_ts)
        try:
            datetime.fromisoformat(self.ts[:-1])  # a real date and time
        except ValueError:
            raise ValueError(bad_ts) from None
        if not isinstance(self.sim, bool) or not isinstance(self.historical, bool):
            raise TypeError("sim and historical must be booleans")

    @classmethod
    def at(
        cls,
        seq: int,
        session: int,
        when: datetime,
        *,
        sim: bool = False,
        historical: bool = False,
    ) -> Envelope:
        """An envelope stamped with an aware datetime (converted to UTC)."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("ts: a naive datetime is ambiguous; pass an aware one (UTC)")
        return cls(seq, session, utc_ts(when), sim, historical)

    def fields(self, *, sim: bool = False) -> Payload:
        """The envelope as payload keys; ``sim`` ORs in the data's own simulated flag so
        that simulated data is never sent as real."""
        return {
            "schema": SCHEMA,
            "session": self.session,
            "seq": self.seq,
            "ts": self.ts,
            "sim": self.sim or sim,
            "historical": self.historical,
        }


def status_payload(
    env: Envelope,
    online: bool,
    software_version: str,
    site: str,
    room: str,
    *,
    config_hash: str | None = None,
    origin: str | None = None,
) -> Payload:
    """``status`` (retained): online, the birth; offline, the broker's Last Will, with the
    same session (daemon/mqtt/birth.py). ``config_hash``: sha256 hex of the site config's
    bytes; ``origin``: the audit log's; each left out when None (a sink built without
    them, as in tests; the daemon always gives both)."""
    out: Payload = {
        **env.fields(),
        "online": online,
        "software_version": software_version,
        "site": site,
        "room": room,
    }
    if config_hash is not None:
        out["config_hash"] = config_hash
    if origin is not None:
        out["origin"] = origin
    return out


def telemetry_payload(env: Envelope, sample: Sample) -> Payload:
    """``telemetry``: one per sample. Readings are the device's own (``at`` is the
    device-clock time of the sample); the delivery fields are the tracker's view, null
    while no delivery has been seen."""
    r = sample.reading
    d = sample.delivery
    return {
        **env.fields(sim=r.simulated or (d is not None and d.simulated)),
        "device": sample.device,
        "at": utc_ts(r.utc),
        "state": str(r.state),
        "phase": None if d is None else str(d.phase),
        "delivery_id": None if d is None else d.delivery_id,
        "dose_rate_gy_min": num(r.dose_rate_gy_min),
        "dose_primary_gy": num(r.dose_primary_gy),
        "dose_secondary_gy": num(r.dose_secondary_gy),
        "preset_gy": num(r.preset_gy),
        "remaining_gy": None if d is None else num(d.remaining_gy),
        "beam_on_s": num(r.beam_on_s),
        "elapsed_s": None if d is None else num(d.elapsed_s),
        "estimated_remaining_s": None if d is None else num(d.estimated_remaining_s),
        "kv": num(r.kv),
        "ua": num(r.ua),
    }


# The plausible range of each applicator number (docs/schemas/v1/applicator.schema.json says
# the same): a finite reading outside it is no measurement (a driver or device fault) and is
# sent as null, "not known", which a consumer never reads as safe.
APPLICATOR_BOUNDS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "diameter_mm": (0.0, 1000.0),
        "component_mm": (-10000.0, 10000.0),
        "magnitude_mm": (0.0, 20000.0),
        "tilt_deg": (0.0, 180.0),
        "tolerance_mm": (0.0, 1000.0),
    }
)
COUNT_MAX = 2**64 - 1


def _bounded(x: float | None, bound: str) -> float | str | None:
    if x is None or isinstance(x, bool):
        return None
    lo, hi = APPLICATOR_BOUNDS[bound]
    if math.isfinite(x) and not lo <= x <= hi:
        return None
    return num(float(x))


def _count(x: int | None) -> int | None:
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= COUNT_MAX:
        return x
    return None


def _identity(a: ApplicatorIdentity | None) -> Payload | None:
    if a is None:
        return None
    return {
        "type": a.type,
        "diameter_mm": _bounded(a.diameter_mm, "diameter_mm"),
        "serial": a.serial,
    }


def applicator_payload(env: Envelope, sample: ApplicatorSample) -> Payload:
    """``applicator``: one per reading of an applicator reader and stand. The reading is
    the device's own (``at`` on the device clock; the yes/no sensors as ``"yes"``, ``"no"``
    or ``"unknown"``; displacement since the stand's lock); ``displacement_from_beam_on_mm``
    and ``peak_displacement_mm`` are the daemon's, null when not known (no delivery, no
    beam-on yet). ``tolerance_mm`` is present only when the daemon supplies one. A finite
    number outside its plausible range (:data:`APPLICATOR_BOUNDS`) is sent as null."""
    r = sample.reading
    d = r.displacement_mm
    out: Payload = {
        **env.fields(sim=r.simulated),
        "device": sample.device,
        "at": utc_ts(r.utc),
        "delivery_id": sample.delivery_id,
        "applicator": _identity(r.applicator),
        "uses_left": _count(r.uses_left),
        "state": str(r.state),
        "fault": None if r.fault is None else str(r.fault),
        "seated": str(r.seated),
        "source_locked": str(r.source_locked),
        "brakes_engaged": str(r.brakes_engaged),
        "displacement_mm": None
        if d is None
        else {k: _bounded(v, "component_mm") for k, v in zip("xyz", d, strict=True)},
        "displacement_magnitude_mm": _bounded(r.displacement_magnitude_mm, "magnitude_mm"),
        "displacement_from_beam_on_mm": _bounded(
            sample.displacement_from_beam_on_mm, "magnitude_mm"
        ),
        "peak_displacement_mm": _bounded(sample.peak_displacement_mm, "magnitude_mm"),
        "tilt_deg": _bounded(r.tilt_deg, "tilt_deg"),
        "lock_counter": _count(r.lock_counter),
        "seat_counter": _count(r.seat_counter),
        "heartbeat": _count(r.heartbeat),
    }
    # Not on ApplicatorSample yet (the applicator rules add it): sent when it is there.
    tolerance = getattr(sample, "tolerance_mm", None)
    if isinstance(tolerance, int | float) and not isinstance(tolerance, bool):
        bounded = _bounded(float(tolerance), "tolerance_mm")
        if isinstance(bounded, float):
            out["tolerance_mm"] = bounded
    return out


def interlocks_payload(
    env: Envelope, interlocks: Mapping[Interlock, InterlockState], all_clear: bool
) -> Payload:
    """``interlocks`` (retained): every interlock, those not in ``interlocks`` as unknown.
    ``all_clear`` is true only when the caller says so and every interlock is ok
    (fail-safe: unknown counts as tripped)."""
    states = {
        il.value: InterlockState(interlocks.get(il, InterlockState.UNKNOWN)) for il in Interlock
    }
    clear = all_clear and all(s is InterlockState.OK for s in states.values())
    return {
        **env.fields(),
        "interlocks": {k: v.value for k, v in states.items()},
        "all_clear": clear,
    }


def alarms_payload(env: Envelope, items: Iterable[Mapping[str, Any]], omitted: int) -> Payload:
    """``alarms`` (retained): the room's standing alarms and the cleared ones not yet
    acknowledged, oldest first (daemon/alarm_ledger.py builds the items: key, code,
    severity, message, raised_at, cleared_at, delivery_id, acknowledged {by, name, at} or
    null); ``omitted``: unacknowledged cleared ones beyond the ledger's cap."""
    return {**env.fields(), "alarms": [dict(i) for i in items], "omitted": omitted}


def _delivery(s: DeliverySnapshot) -> Payload:
    return {
        "delivery_id": s.delivery_id,
        **summary_data(s),
        "dose_rate_gy_min": num(s.dose_rate_gy_min),
        "estimated_remaining_s": num(s.estimated_remaining_s),
        # The latest check against the prescription (daemon/verification.py), or null.
        "verification": None if s.verification is None else dict(s.verification),
    }


def delivery_payload(
    env: Envelope, snapshot: DeliverySnapshot | None, record: Mapping[str, Any] | None = None
) -> Payload:
    """``delivery`` (retained): the current or last delivery; ``delivery: null`` until the
    daemon has seen one (distinct from a retained message that is absent or cleared).
    ``record``: once a signed checkpoint covers the ended delivery, what a sign-off of it
    signs (auditlog/signoff.py; daemon/signoff.py publishes it); absent before."""
    if snapshot is None:
        return {**env.fields(), "delivery": None}
    d = _delivery(snapshot)
    if record is not None:
        d["record"] = dict(record)
    return {**env.fields(sim=snapshot.simulated), "delivery": d}


def event_payloads(
    env_factory: Callable[[], Envelope],
    events: Iterable[TrackerEvent],
    *,
    current_delivery: str | None = None,
) -> list[Payload]:
    """``events``: one message per tracker event, in order; ``env_factory`` is called once
    per message (so it hands out consecutive ``seq``).

    ``current_delivery`` is the delivery an interlock change belongs to (interlock events do
    not name one), as for the audit log. ``at`` is the device-clock time of the observation:
    a gap's start or end for gap events; a delivery_terminated or delivery_amended event has
    no time of its own and takes that of the event before it in the same batch (the phase
    change that closed the delivery), or null if there is none.
    """
    out: list[Payload] = []
    last_at: str | None = None
    for ev in events:
        if isinstance(ev, VerificationChecked):  # the MQTT object, not the log's entry
            obj = dict(ev.public)
            out.append(
                {
                    **env_factory().fields(sim=ev.simulated),
                    "kind": "verification",
                    "delivery_id": ev.delivery_id,
                    "at": obj["at"],
                    "verification": obj,
                }
            )
            continue
        kind, data, delivery_id = event_entry(ev, current_delivery)
        data = dict(data)
        if kind == "monitoring_gap_started":
            at = data["start"]
        elif kind == "monitoring_gap_ended":
            at = data["end"]
        elif kind in ("delivery_terminated", "delivery_amended"):
            at = last_at
        else:
            at = data.pop("at")
        last_at = at if at is not None else last_at
        simulated = isinstance(ev, Terminated | DeliveryAmended) and ev.summary.simulated
        out.append(
            {
                **env_factory().fields(sim=simulated),
                "kind": kind,
                "delivery_id": delivery_id,
                "at": at,
                **data,
            }
        )
    return out


def notice_payload(
    env: Envelope,
    severity: str,
    message: str,
    *,
    delivery_id: str | None = None,
    command: Mapping[str, Any] | None = None,
) -> Payload:
    """``events``, kind ``daemon_notice``: news that cannot wait for the record, above all
    that the audit log cannot be written (``critical``: what is shown is not yet
    recorded) and that it recovered (``info``). ``at`` is the envelope's ``ts``.
    ``command``: the structured answer when the notice answers a command
    (daemon/answers.py): what a sender matches on, never ``message``. Absent otherwise,
    so that a notice that answers nothing (the audit log failing) still passes the schema
    of a dashboard older than the field."""
    if severity not in NOTICE_SEVERITIES:
        raise ValueError(f"notice severity {severity!r}: expected one of {NOTICE_SEVERITIES}")
    out: Payload = {
        **env.fields(),
        "kind": NOTICE_KIND,
        "delivery_id": delivery_id,
        "at": env.ts,
        "severity": severity,
        "message": message,
    }
    if command is not None:
        out["command"] = dict(command)
    return out


def report_payload(env: Envelope, kind: str, data: Mapping[str, Any]) -> Payload | None:
    """``events``, a sink's recorded entry (``kind`` from REPORT_FIELDS): the delivery it
    concerns and the listed fields (absent ones null); None for a kind not listed."""
    fields = REPORT_FIELDS.get(kind)
    if fields is None:
        return None
    did = data.get("delivery_id")
    return {
        **env.fields(),
        "kind": kind,
        "delivery_id": did if isinstance(did, str) else None,
        "at": env.ts,
        **{f: data.get(f) for f in fields},
    }


def checkpoint_payload(env: Envelope, note: str, cosignatures: Sequence[str] = ()) -> Payload:
    """``audit/checkpoint`` (retained): the latest signed checkpoint, parsed for display
    (origin, entry count, head hash in hex) and whole (``note``) for verification off the
    host. The signature is not checked here; raises ValueError if the note is malformed.
    ``cosignatures``: the witnesses' lines the daemon has verified and recorded
    (daemon/witnessing.py), appended to the note as C2SP tlog-cosignature says and listed
    in ``cosignatures`` (absent until a witness has cosigned this checkpoint)."""
    cp, _ = Checkpoint.parse_verified(note, None)
    lines = [c.rstrip("\n") for c in cosignatures]
    payload: Payload = {
        **env.fields(),
        "origin": cp.origin,
        "count": cp.count,
        "head": cp.head_hash,
        "note": note + "".join(line + "\n" for line in lines),
    }
    if lines:
        payload["cosignatures"] = lines
    return payload


def skip_payload(
    env: Envelope, *, of_topic: str, of_session: int, first: int, last: int, reason: str
) -> Payload:
    """``skip``: seqs ``first`` .. ``last`` (inclusive) of stream ``of_topic`` in session
    ``of_session`` will never be published with content, and a consumer counts them as
    accounted for, never as loss. ``reason``: ``unpublished`` (reserved in a durable block,
    not published before a crash or stop: daemon/mqtt/outbox.py), ``not_held`` (a replay
    asked for what the room no longer holds), ``thinned`` (dropped under the outbox's byte
    bound). ``of_session`` may be older than the envelope's session."""
    if of_topic not in SKIPPABLE_TOPICS:
        raise ValueError(f"skip of_topic {of_topic!r}: expected one of {SKIPPABLE_TOPICS}")
    if reason not in SKIP_REASONS:
        raise ValueError(f"skip reason {reason!r}: expected one of {SKIP_REASONS}")
    if not _is_int(of_session) or not 1 <= of_session <= SEQ_MAX:
        raise ValueError(f"skip of_session {of_session!r}: must be an integer in 1..2**64-1")
    for what, x in (("first", first), ("last", last)):
        if not _is_int(x) or not 0 <= x <= SEQ_MAX:
            raise ValueError(f"skip {what} {x!r}: must be an integer in 0..2**64-1")
    if first > last:
        raise ValueError(f"skip first {first} > last {last}: an empty or reversed range")
    return {
        **env.fields(),
        "skipped": {
            "topic": of_topic,
            "session": of_session,
            "first": first,
            "last": last,
            "reason": reason,
        },
    }
