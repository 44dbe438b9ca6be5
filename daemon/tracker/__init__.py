"""The delivery tracker: a pure state machine that turns readings into a delivery.

No I/O and no clock reads: time arrives with the readings (``mono_ns``, ``utc``) and with
``tick``. Feed it by hand in tests; the daemon feeds it from drivers.

The package, by concern: ``events`` (the vocabulary sinks consume: phases, alarms,
segments, snapshots, events), ``settings`` (the tolerances, the single source of every
default), ``machine`` (the state table), ``dose`` (dose accounting of one delivery),
``alarms`` (the alarm rules as a table, and the one loop that judges it), ``applicator``
(what the tracker keeps of the applicator reader, and the monitor's own applicator
interlock), ``follow``
(``DeliveryMachine``: the phase machine, the moves that follow the console), ``restart``
(taking over after a restart) and ``core`` (``DeliveryTracker``: inputs in, events out; it
holds a ``DeliveryMachine``, an ``AlarmBook`` and a ``Takeover``, and inherits nothing).
Import from the package, which re-exports what the daemon and the sinks use.

Rules it enforces (docs/domain.md, "How delivery is controlled"):
- delivered dose never decreases; a console whose cumulative count goes down, reports an
  unknown state or non-finite values is contradictory input and drives the tracker to FAULT;
  a delivery closed from FAULT is never NORMAL;
- an interlock the console did not report, or that could not be read, is unknown, and unknown
  counts as tripped (``all_clear`` is true only when every interlock is ok);
- an interrupted-then-resumed delivery is a sequence of dose segments that tile the
  delivered dose with no gap and no double count; dose that rises while the beam is
  supposed to be off is kept (never lost) in a segment of its own, flagged, and alarmed;
- a monitoring gap (link lost, nothing heard from the device) makes every interlock
  unknown and is recorded with its start and end. Time inside it is unknown, not beam-on,
  and never a contradiction: beam-on is the console's timer, or the host's view between
  two consecutive readings; an end that fell inside a gap is bounded by it and says so;
- elapsed runs from the first beam as the console's timer places it, and is never shorter
  than beam-on (one time base on every display);
- an alarm is a row of one table (docs/alarms.md lists them): a condition, a hold time,
  when it clears; a held condition is judged only on readings and a gap restarts it;
- an event carries the delivery id only while that delivery is open: the end entry is the
  last of its reading, and after it everything belongs to the room;
- after a restart, ``resume`` takes over the delivery the log shows open; the first
  believed reading decides whether the console is in the same selection (continue it),
  a new one (close it UNKNOWN), or cannot tell (close it and link the next record);
  ``link_unvouched`` names a delivery the start closed because its whole record was
  unvouched: a record started on the first believed reading links to it, with all the
  dose shown then as ``in_previous_record``. A link is only for a record that starts on
  the reading that decided it.
"""

from iortd.daemon.tracker.applicator import ApplicatorView
from iortd.daemon.tracker.core import DeliveryTracker
from iortd.daemon.tracker.events import (
    NS,
    Alarm,
    AlarmCleared,
    AlarmCode,
    AlarmRaised,
    ApplicatorAtBeamOn,
    ApplicatorRelocked,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    DeviceGapEnded,
    DeviceGapStarted,
    Gap,
    InterlockChanged,
    Interruption,
    MonitoringGapEnded,
    MonitoringGapStarted,
    MonitorInterlockChanged,
    Phase,
    PhaseChanged,
    ResumedDelivery,
    Segment,
    Severity,
    Terminated,
    TrackerEvent,
    VerificationChecked,
)
from iortd.daemon.tracker.machine import TRANSITIONS, IllegalTransition
from iortd.daemon.tracker.settings import TrackerSettings

__all__ = [
    "NS",
    "TRANSITIONS",
    "Alarm",
    "AlarmCleared",
    "AlarmCode",
    "AlarmRaised",
    "ApplicatorAtBeamOn",
    "ApplicatorRelocked",
    "ApplicatorView",
    "DeliveryAmended",
    "DeliverySnapshot",
    "DeliveryStarted",
    "DeliveryTracker",
    "DeviceGapEnded",
    "DeviceGapStarted",
    "Gap",
    "IllegalTransition",
    "InterlockChanged",
    "Interruption",
    "MonitorInterlockChanged",
    "MonitoringGapEnded",
    "MonitoringGapStarted",
    "Phase",
    "PhaseChanged",
    "ResumedDelivery",
    "Segment",
    "Severity",
    "Terminated",
    "TrackerEvent",
    "TrackerSettings",
    "VerificationChecked",
]
