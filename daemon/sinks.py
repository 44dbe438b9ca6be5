"""Where the daemon's observations go.

The daemon hands every sample and every tracker event to its sinks in order; the first
sink is the record (the audit log, once it exists) and is awaited before any other sink is
told, so nothing is shown that is not recorded. A sink must not block the device loop for
long: sinks that talk to the network queue internally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from iortd.daemon.tracker import (
    AlarmCleared,
    AlarmRaised,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    InterlockChanged,
    MonitoringGapEnded,
    MonitoringGapStarted,
    PhaseChanged,
    Terminated,
    TrackerEvent,
)
from iortd.kernel.types import DeviceIdentity, Interlock, InterlockState, SourceReading

__all__ = ["OperationalLogSink", "Sample", "Sink"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading with the tracker's view after taking it."""

    device: str
    reading: SourceReading
    delivery: DeliverySnapshot | None
    interlocks: Mapping[Interlock, InterlockState]
    all_clear: bool


class Sink(Protocol):
    name: str

    async def run(self) -> None:
        """The sink's own work (a network connection), run as a task from start until
        :meth:`aclose`; return at once if there is none. Must not raise for trouble it
        can retry."""
        ...

    async def started(self, device: str, identity: DeviceIdentity) -> None: ...

    async def sample(self, sample: Sample) -> None: ...

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        """Tracker events in order; ``delivery`` is the tracker's view after them (also
        when no reading came with them: a gap, a lost link)."""
        ...

    async def checkpoint(self, note: str) -> None:
        """A signed checkpoint of the audit log, to keep a copy off the host."""
        ...

    async def notice(self, severity: str, message: str) -> None:
        """Out-of-band news that cannot wait for the record (the log itself failing)."""
        ...

    async def aclose(self) -> None: ...


class OperationalLogSink:
    """Events (not samples) to the operational log. Carries no patient data: delivery ids
    are pseudonymous and readings hold none."""

    name = "oplog"

    def __init__(self) -> None:
        self._log = structlog.get_logger("iortd.events")

    async def run(self) -> None:
        return None

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

    async def sample(self, sample: Sample) -> None:
        return None

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

    async def checkpoint(self, note: str) -> None:
        first = note.split("\n", 3)
        self._log.info("audit_checkpoint", origin=first[0], count=int(first[1]))

    async def notice(self, severity: str, message: str) -> None:
        level = "critical" if severity == "critical" else "info"
        getattr(self._log, level)("notice", message=message)

    async def aclose(self) -> None:
        return None
