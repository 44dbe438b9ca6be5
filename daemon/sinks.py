"""Where the daemon's observations go: the sink base, public for plug-ins.

The daemon hands every sample and every tracker event to its sinks in order; the first
is the record (the audit log) and is written before any other sink is told, so nothing is
shown that is not recorded. Every other sink is a :class:`Sink`: it runs behind its own
bounded queue and task (:mod:`iortd.daemon.sink_queue`), so a slow sink delays only
itself, and what it misses when its queue overflows is counted, logged and recorded.

A sink from another package subclasses :class:`Sink`, overrides the callbacks it cares
about (the others are no-ops), and registers a :class:`SinkFactory` under the entry-point
group ``iort.sinks``; a ``[[sinks]]`` table in the site config names it by ``type`` and
gives its ``options``, which the factory validates at config load (docs/engineers.md,
"Writing a sink"). This module (which re-exports the tracker's events and its delivery
snapshot, so that a plug-in never reaches into the tracker's own modules) and
``iortd.kernel.types`` are what such a package may import.

Callbacks run in the sink's own task, one at a time and in order, each bounded by the
sink's ``timeout_s``; an exception is logged (``sink_failed``) and the sink misses that
item, nothing more. A callback must not block the event loop (file or database work goes
through ``asyncio.to_thread`` or an async client).

A sink that must put something on the record itself (the DICOM sender: each hand-off
attempt's outcome) gets ``SinkContext.record``: one typed entry, of a type listed in
:data:`SINK_ENTRY_TYPES`, appended through the daemon's writer and then shown on the
other sinks (:meth:`Sink.report`: the MQTT sink's ``events`` topic); see
:mod:`iortd.daemon.sink_records`. A sink that acts on a physicist's sign-off hears of it
through :meth:`Sink.signed`, once the ``delivery_signed`` entry is on disk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import structlog

from iortd.auditlog.note import Verifier
from iortd.daemon.tracker import (
    AlarmCleared,
    AlarmRaised,
    ApplicatorAtBeamOn,
    ApplicatorRelocked,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    DeviceGapEnded,
    DeviceGapStarted,
    InterlockChanged,
    MonitoringGapEnded,
    MonitoringGapStarted,
    MonitorInterlockChanged,
    PhaseChanged,
    Terminated,
    TrackerEvent,
)
from iortd.kernel.types import (
    ApplicatorReading,
    DeviceIdentity,
    Interlock,
    InterlockState,
    SourceReading,
)

__all__ = [
    "HANDOFF_OUTCOMES",
    "HANDOFF_WHAT",
    "OVERFLOW_POLICIES",
    "SINK_ENTRY_TYPES",
    "AlarmCleared",
    "AlarmRaised",
    "ApplicatorSample",
    "DeliveryAmended",
    "DeliverySnapshot",
    "DeliveryStarted",
    "InterlockChanged",
    "MonitoringGapEnded",
    "MonitoringGapStarted",
    "OperationalLogSink",
    "Overflow",
    "PhaseChanged",
    "Recorder",
    "Sample",
    "Sink",
    "SinkConfigError",
    "SinkContext",
    "SinkFactory",
    "SinkOptionError",
    "SinkSpec",
    "Terminated",
    "TrackerEvent",
    "UnknownSinkError",
]

Overflow = Literal["drop_oldest", "block"]
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("drop_oldest", "block")

# The entry types a sink may append through ``SinkContext.record`` (docs/audit-log.md
# lists each one's fields), each with the one sink type (``[[sinks]] type``) that may write
# it. A type is added here, never chosen by a plug-in: the record's vocabulary stays the
# project's, and one plug-in cannot write another's entries.
SINK_ENTRY_TYPES: Mapping[str, str] = MappingProxyType({"dicom_handoff": "dicom"})
# A ``dicom_handoff`` entry's ``outcome`` and ``what`` (docs/audit-log.md; the events
# schema lists the same words).
HANDOFF_OUTCOMES: tuple[str, ...] = (
    "queued",  # in the outbox, on disk, before any attempt
    "stored",  # C-STORE success (0x0000)
    "warning",  # C-STORE warning status: stored, the status says how
    "failed",  # C-STORE failure status: retried
    "refused",  # association rejected or aborted: retried
    "unreachable",  # no connection (or a timeout): retried
    "committed",  # Storage Commitment: the receiver says it holds the instance
    "commit_failed",  # Storage Commitment failure (reason code in status): resent
    "overdue",  # not handed off within the alarm bound: an alarm, still retried
    "build_failed",  # the instances could not be built from the log: retried
)
HANDOFF_WHAT: tuple[str, ...] = ("record", "report")

# ``SinkContext.record``: append one entry of a listed type; True once it is in the log
# (or handed to a failing disk's spill), False when it was not recorded (the daemon is
# stopping, the type is not listed, the data cannot be written faithfully).
Recorder = Callable[[str, Mapping[str, Any]], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading with the tracker's view after taking it."""

    device: str
    reading: SourceReading
    delivery: DeliverySnapshot | None
    interlocks: Mapping[Interlock, InterlockState]
    all_clear: bool


@dataclass(frozen=True, slots=True)
class ApplicatorSample:
    """One reading of an applicator reader and stand (role ``applicator``), with what the
    daemon derived from it: the tip's displacement since beam-on and the delivery's peak
    displacement (from the stand's lock; a re-lock never resets it). ``None`` where it is
    not known (no delivery, no beam-on yet, the reader reports no displacement)."""

    device: str
    reading: ApplicatorReading
    delivery_id: str | None
    displacement_from_beam_on_mm: float | None
    peak_displacement_mm: float | None


class Sink:
    """A destination for what the daemon observes. Every callback is a no-op here:
    override the ones you need. ``name`` names the sink in the operational log and in the
    audit log's ``sink_overflow`` entries (a slug: never patient data)."""

    name: str = "sink"

    async def start(self) -> None:
        """Open what the sink needs (a connection pool, a file) before the daemon runs;
        bounded by the sink's ``timeout_s``. Raise :class:`SinkConfigError` to refuse to
        start (exit status 2, nothing touched yet but the audit log)."""
        return None

    async def run(self) -> None:
        """The sink's own background work (a network connection), run as a task from the
        start until :meth:`aclose`; return at once if there is none. Must not raise for
        trouble it can retry."""
        return None

    async def started(self, device: str, identity: DeviceIdentity) -> None:
        """A device was connected and identified (also after each reconnection)."""
        return None

    async def sample(self, sample: Sample) -> None:
        """One reading, with the tracker's view after it."""
        return None

    async def applicator(self, sample: ApplicatorSample) -> None:
        """One reading of an applicator reader and stand, with what the daemon derived."""
        return None

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        """Tracker events in order; ``delivery`` is the tracker's view after them (also
        when no reading came with them: a gap, a lost link)."""
        return None

    async def checkpoint(self, note: str) -> None:
        """A signed checkpoint of the audit log (C2SP signed-note text), to keep a copy off
        the host."""
        return None

    async def signed(self, delivery_id: str, meaning: str) -> None:
        """A physicist's sign-off of an ended delivery is on the record (its
        ``delivery_signed`` entry is on disk): ``meaning`` is ``reviewed``, ``approved``
        or ``approved_with_deviation``."""
        return None

    async def report(self, kind: str, data: Mapping[str, Any]) -> None:
        """An entry a sink appended through ``SinkContext.record`` is on the record
        (``kind`` from :data:`SINK_ENTRY_TYPES`; ``data`` as in the log): to show it (the
        MQTT sink publishes it on ``events``)."""
        return None

    async def notice(self, severity: str, message: str) -> None:
        """Out-of-band news that cannot wait for the record (the log itself failing);
        ``severity`` is ``"critical"`` or ``"info"``."""
        return None

    async def aclose(self) -> None:
        """Flush and close; bounded by the daemon's shutdown. Called once, after the
        sink's queue has drained (or its drain bound has passed)."""
        return None


class SinkConfigError(Exception):
    """A sink cannot be built from its config, or refuses to start: fix the config."""


class UnknownSinkError(SinkConfigError):
    """A config names a sink type that is not installed."""

    def __init__(self, name: str, installed: list[str]) -> None:
        self.name = name
        self.installed = sorted(installed)
        listed = ", ".join(self.installed) or "none"
        super().__init__(f"sink type {name!r} is not installed (installed sinks: {listed})")


class SinkOptionError(SinkConfigError):
    """One option of a sink is wrong; ``key`` is its path below the ``[[sinks]]`` table
    (e.g. ``options.url``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """What one ``[[sinks]]`` table says, handed to its factory's ``create``."""

    name: str  # unique among the daemon's sinks; the type unless the table names it
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What the composition root lends a sink. ``simulated``: the data come from a
    simulator (say so in anything shown or sent). ``state_dir``: a directory of the
    sink's own, under the audit log's directory (and so under its lock: one daemon per
    directory); not created until the sink creates it. ``origin``: the audit log's name
    (as in its checkpoints); ``verifier``: the public key its checkpoints are signed with
    (None when they are not signed), for a sink that keeps checkpoints off the host;
    ``config_hash``: sha256 (hex) of the site config's bytes ("" when not known).
    ``log_directory``: the audit log's directory, to READ the record from (never to
    write). ``record``: appends one entry of a type :data:`SINK_ENTRY_TYPES` gives to this
    sink's type (log
    first, then every sink's :meth:`Sink.report`); None where nothing may be recorded
    (a test's context). ``notice``: out-of-band news to every sink (``"critical"`` or
    ``"info"``), as :meth:`Sink.notice` hears it: for an alarm that cannot wait."""

    site: str
    room: str
    simulated: bool
    state_dir: Path
    origin: str = ""
    verifier: Verifier | None = None
    config_hash: str = ""
    log_directory: Path | None = None
    record: Recorder | None = None
    notice: Callable[[str, str], None] | None = None


class SinkFactory(Protocol):
    """The object an ``iort.sinks`` entry point resolves to (a class, instantiated once
    without arguments, or an instance with these members).

    A factory may also have ``path_options: frozenset[str]``: the option keys that hold a
    file path. The config loader makes such a relative path absolute against the config
    file's directory, like every other path in the config, before ``validate``.
    """

    name: str

    def validate(self, options: Mapping[str, Any]) -> None:
        """Check the ``options`` table without touching anything (no network, no file
        writes); raise :class:`SinkOptionError` naming the key (``options.KEY``). Unknown
        keys are errors."""
        ...

    def create(self, spec: SinkSpec, context: SinkContext) -> Sink:
        """Build the sink from validated options; it starts in :meth:`Sink.start`."""
        ...


class OperationalLogSink(Sink):
    """Events (not samples) to the operational log. Carries no patient data: delivery ids
    are pseudonymous and readings hold none."""

    name = "oplog"

    def __init__(self) -> None:
        self._log = structlog.get_logger("iortd.events")

    async def started(self, device: str, identity: DeviceIdentity) -> None:
        self._log.info(
            "device_identified",
            device=device,
            model=identity.model,
            serial=identity.serial,
            firmware=identity.firmware,
            simulated=identity.simulated,
            scenario=identity.scenario,
        )

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        for ev in events:
            # Each line names the delivery its event belongs to, as the audit log does
            # (none for the room's events, also after a restart took a delivery over).
            did = getattr(ev, "delivery_id", None)
            if did is None:
                structlog.contextvars.unbind_contextvars("delivery_id")
            else:
                structlog.contextvars.bind_contextvars(delivery_id=did)
            match ev:
                case DeliveryStarted():
                    self._log.info(
                        "delivery_started", preset_gy=ev.preset_gy, joined=ev.joined_in_progress
                    )
                case PhaseChanged():
                    self._log.info("phase", src=str(ev.src), dst=str(ev.dst), cause=ev.cause)
                case InterlockChanged():
                    self._log.info(
                        "interlock", interlock=str(ev.interlock), old=str(ev.old), new=str(ev.new)
                    )
                case AlarmRaised():
                    level = "error" if ev.alarm.severity == "high" else "warning"
                    getattr(self._log, level)(
                        "alarm_raised",
                        code=str(ev.alarm.code),
                        key=ev.alarm.key,
                        severity=str(ev.alarm.severity),
                        message=ev.alarm.message,
                    )
                case AlarmCleared():
                    self._log.info("alarm_cleared", key=ev.alarm.key)
                case MonitoringGapStarted():
                    self._log.error("monitoring_gap_started", cause=ev.gap.cause)
                case MonitoringGapEnded():
                    self._log.warning(
                        "monitoring_gap_ended",
                        duration_s=(
                            None
                            if ev.gap.end_mono_ns is None
                            else round((ev.gap.end_mono_ns - ev.gap.start_mono_ns) / 1e9, 3)
                        ),
                    )
                case Terminated():
                    s = ev.summary
                    self._log.info(
                        "delivery_terminated",
                        status=str(ev.status),
                        reason=ev.reason,
                        preset_gy=s.preset_gy,
                        delivered_primary_gy=round(s.delivered_primary_gy, 4),
                        delivered_secondary_gy=round(s.delivered_secondary_gy, 4),
                        beam_on_s=round(s.beam_on_s, 1),
                        interruptions=len(s.interruptions),
                        gaps=len(s.gaps),
                    )
                case DeliveryAmended():
                    self._log.warning(
                        "delivery_amended",
                        delivery_id=ev.delivery_id,
                        reason=ev.reason,
                        delivered_primary_gy=round(ev.summary.delivered_primary_gy, 4),
                    )
                case MonitorInterlockChanged():
                    self._log.info(
                        "monitor_interlock",
                        device=ev.device,
                        interlock=str(ev.interlock),
                        old=str(ev.old),
                        new=str(ev.new),
                        cause=ev.cause,
                    )
                case DeviceGapStarted():
                    self._log.error("device_gap_started", device=ev.device, cause=ev.gap.cause)
                case DeviceGapEnded():
                    self._log.warning("device_gap_ended", device=ev.device)
                case ApplicatorRelocked():
                    self._log.warning(
                        "applicator_relocked",
                        device=ev.device,
                        displacement_before_mm=ev.displacement_before_mm,
                    )
                case ApplicatorAtBeamOn():
                    self._log.info(
                        "applicator_at_beam_on",
                        device=ev.device,
                        displacement_mm=ev.displacement_mm,
                        tilt_deg=ev.tilt_deg,
                    )

    async def checkpoint(self, note: str) -> None:
        first = note.split("\n", 3)
        self._log.info("audit_checkpoint", origin=first[0], count=int(first[1]))

    async def notice(self, severity: str, message: str) -> None:
        level = "critical" if severity == "critical" else "info"
        getattr(self._log, level)("notice", message=message)
