"""After a restart of the daemon: taking over a delivery the log shows open, and linking a
new record to one that could not be taken over.

``DeliveryTracker.resume`` takes over the delivery the log shows open; the first believed
reading decides whether the console is in the same selection (continue it), a new one
(close it UNKNOWN), or cannot tell (close it and link the next record).
``link_unvouched`` names a delivery the start closed because its whole record was
unvouched: a record started on the first believed reading links to it, with all the dose
shown then as ``in_previous_record``. A link is only for a record that starts on the
reading that decided it. The decisions are pure functions of the record and the reading;
:class:`Takeover`, which the tracker holds, keeps what is pending until the first believed
reading and applies the verdict to the phase machine (follow.py).
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from iortd.daemon.tracker.dose import DeliveryRecord
from iortd.daemon.tracker.events import (
    NS,
    Interruption,
    Phase,
    ResumedDelivery,
    Segment,
    TrackerEvent,
)
from iortd.daemon.tracker.follow import DeliveryMachine
from iortd.kernel.types import DeviceState, SourceReading, TerminationStatus

__all__ = [
    "STARTS_A_RECORD",
    "Takeover",
    "continue_selection",
    "is_own_id",
    "resumed_record",
    "same_selection",
    "unvouched_link_reason",
]

P = Phase

IN_SELECTION = frozenset(
    {
        DeviceState.PREPARATORY,
        DeviceState.READY,
        DeviceState.IRRADIATING,
        DeviceState.INTERRUPTED,
        DeviceState.TERMINATED,
        DeviceState.FAULT,
        DeviceState.EMERGENCY_STOP,
    }
)


def same_selection(rd: ResumedDelivery, r: SourceReading) -> tuple[str, str]:
    """Is the console still in the selection the record shows open? ("same" | "new" |
    "unsure", why). With a selection counter on both sides, the counter decides (with the
    preset and the counts); without one, the fallback is: same preset, and the dose and
    beam-on counts not reset, with some dose already recorded (before any dose a new
    selection of the same preset looks the same, so that is "unsure")."""
    if r.state not in IN_SELECTION:
        return "new", f"the console left the selection meanwhile (now {r.state})"
    if r.preset_gy != rd.preset_gy:
        return "new", f"the console shows another preset ({rd.preset_gy} -> {r.preset_gy} Gy)"
    if r.dose_primary_gy < rd.primary_gy or r.beam_on_s < rd.beam_on_s:
        return "new", (
            f"the console's counters were reset (dose {rd.primary_gy:.4f} -> "
            f"{r.dose_primary_gy:.4f} Gy): a new selection"
        )
    if rd.selection is not None and r.selection is not None:
        if rd.selection != r.selection:
            return (
                "new",
                f"the console's selection counter changed ({rd.selection} -> {r.selection})",
            )
        return "same", "same selection counter"
    if rd.selection is not None or r.selection is not None:
        return "unsure", (
            "the selection counter is known on one side only (recorded "
            f"{rd.selection}, console {r.selection}): cannot be sure it is the same selection"
        )
    if rd.primary_gy > 0:
        return "same", "same preset, counts not reset (the console reports no selection counter)"
    return "unsure", (
        "no dose recorded yet and the console reports no selection counter: cannot be sure "
        "it is the same selection"
    )


# What follows the room in a delivery id this daemon makes (DeliveryMachine._new_delivery):
# the start time to the microsecond, and a counter when two start within one.
OWN_ID_SUFFIX = r"-[0-9]{8}T[0-9]{12}Z(?:-[1-9][0-9]{0,5})?"

# The console states from which a reading with no delivery open starts a record.
STARTS_A_RECORD = frozenset(
    {DeviceState.PREPARATORY, DeviceState.READY, DeviceState.IRRADIATING, DeviceState.INTERRUPTED}
)


def is_own_id(prefix: str, delivery_id: str) -> bool:
    """Whether ``delivery_id`` has the form of this daemon's own ids for this room. The id
    comes from entries anyone who can write the log directory may have written; it is
    repeated on the events topic and in reports only in that form (never a name, never
    oversized)."""
    own = re.escape(prefix) + OWN_ID_SUFFIX
    return re.fullmatch(own, delivery_id, flags=re.ASCII) is not None


def resumed_record(rd: ResumedDelivery, now_mono_ns: int, now_utc: datetime) -> DeliveryRecord:
    """The open delivery as the log left it, placed on this run's monotonic clock: it has
    been unwatched since ``rd.unwatched_since_utc`` (its ``started_mono_ns``)."""
    ago_ns = max(round((now_utc - rd.unwatched_since_utc).total_seconds() * NS), 0)
    since = now_mono_ns - ago_ns
    d = DeliveryRecord(
        delivery_id=rd.delivery_id,
        joined=False,
        started_mono_ns=since,
        started_utc=rd.started_utc,
        preset_gy=rd.preset_gy,
        planned_time_s=None,
        applicator=None,
        simulated=rd.simulated,
        primary_gy=rd.primary_gy,
        secondary_gy=rd.secondary_gy,
        device_beam_on_s=rd.beam_on_s,
    )
    if rd.primary_gy > 0:
        # What the earlier run recorded, as one stretch: its samples hold the detail.
        d.segments.append(Segment("before_restart", 0.0, rd.primary_gy, since, since))
    if rd.phase in (P.IRRADIATING, P.INTERRUPTED) or rd.primary_gy > 0:
        d.first_beam_mono_ns = since - round(rd.elapsed_s * NS)
    return d


def continue_selection(d: DeliveryRecord, phase: Phase, r: SourceReading) -> None:
    """The console is still in the selection taken over: the outage is a gap in it."""
    if r.dose_primary_gy > d.primary_gy:
        # Given while nobody watched: kept, never counted twice, never beam-off.
        d.add_dose_segment("unmonitored", r.dose_primary_gy, r.mono_ns)
    d.secondary_gy = max(d.secondary_gy, r.dose_secondary_gy)
    d.planned_time_s = r.planned_time_s or d.planned_time_s
    d.applicator = r.applicator or d.applicator
    if phase is P.IRRADIATING and r.state is DeviceState.IRRADIATING:
        d.open_segment("beam", r.mono_ns)
    elif phase is P.INTERRUPTED and not d.interruptions:
        d.interruptions.append(
            Interruption("unknown (before the restart)", r.mono_ns, d.primary_gy)
        )


def unvouched_link_reason(delivery_id: str, r: SourceReading) -> str | None:
    """Why the record the first believed reading starts may continue ``delivery_id`` (an
    unvouched record closed UNKNOWN at start), or None when the console is idle or at an
    end (the next delivery is then a new selection)."""
    if r.state not in STARTS_A_RECORD:
        return None
    return (
        f"the record of {delivery_id} was written after the last seal before a crash "
        f"(unvouched) and was closed UNKNOWN at start: nothing vouched says which "
        f"selection it was; the console was in a delivery at the first reading "
        f"({r.state}, {r.dose_primary_gy:.4f} Gy), which may be the same treatment. "
        "That dose is counted as the earlier record's (in_previous_record): how much of "
        "it was watched is unknown"
    )


class Takeover:
    """What a restart leaves pending until the first believed reading: the delivery the
    log shows open (``resume``), or the id of one closed because its whole record was
    unvouched (``link_unvouched``); and the verdict that reading gives."""

    def __init__(self) -> None:
        self.resumed: ResumedDelivery | None = None
        self.unvouched: str | None = None

    def decide(self, m: DeliveryMachine, r: SourceReading, out: list[TrackerEvent]) -> None:
        """The first believed reading after a restart (``r``): apply what it decides."""
        if self.resumed is not None:
            rd, self.resumed = self.resumed, None
            self._decide_resume(m, rd, r, out)
        if self.unvouched is not None:
            delivery_id, self.unvouched = self.unvouched, None
            d = m.delivery
            if m.link is not None or (d is not None and d.termination is None):
                return  # the delivery taken over continues, or its own link comes first
            why = unvouched_link_reason(delivery_id, r)
            if why is not None:
                m.link = (delivery_id, why, math.inf)

    @staticmethod
    def _decide_resume(
        m: DeliveryMachine, rd: ResumedDelivery, r: SourceReading, out: list[TrackerEvent]
    ) -> None:
        """Same selection (continue it), a new one (close it UNKNOWN), or cannot tell
        (close it, and link the record that starts on this reading)."""
        d = m.delivery
        if d is None:  # pragma: no cover - resume() made it
            return
        verdict, why = same_selection(rd, r)
        if verdict == "same":
            continue_selection(d, m.phase, r)
            return
        reason = f"not followed to its end: the daemon was not running; {why}"
        m.close(d, TerminationStatus.UNKNOWN, reason, r.mono_ns, r.utc, P.TERMINATED, out)
        m.move(P.IDLE, "the console's selection could not be continued", r.mono_ns, r.utc, out)
        if verdict == "unsure":
            m.link = (d.delivery_id, why, d.primary_gy)
