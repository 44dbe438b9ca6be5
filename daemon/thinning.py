"""Which readings become audit-log samples: every one around a delivery, and when the room
is idle a heartbeat plus every change that matters (issue 17: a bounded log).

A poll loop at 10 Hz writes ~860 000 samples a day per device; while the room is idle they
almost all say the same thing. The policy is the one process historians call exception
reporting (a value is stored when it moves beyond its deadband, and at the latest after a
maximum interval): here, per device stream (``sample`` of a source, ``applicator_sample``
of a reader),

- **full rate** while the room is *active*: a delivery is open in the tracker, the tracker's
  phase is a delivery phase (PREPARATORY, READY, IRRADIATING, INTERRUPTED), or the console
  reports one of those states; and for ``sample_window_s`` (the clock's seconds) after the
  last active reading, so that the settling of the console and the stand after an end is
  recorded whole. One window for the room: a reader's samples follow the console's
  activity.
- otherwise a sample is recorded when it is the first of its stream in this run, when its
  reading came with tracker events (an interlock, an alarm, a phase, a gap of the device
  ended: anything the tracker judged), when anything in it differs from the stream's last
  recorded sample (exactly, or beyond the ``[log.sample_deadband]`` for the noisy analog
  values: kV, µA, dose rate, displacement, tilt, the device's extra numbers), and at the
  latest ``idle_sample_interval_s`` after the last one (the heartbeat). Dose counters and
  the beam-on timer are compared exactly: dose while idle is never thinned away.
- a reading that is not recorded is held (the newest one per stream). When a change is
  recorded, or before any tracker event is (also one of another device, and a gap started
  by the stale watchdog), or at a clean stop, the held reading goes first, marked
  ``kept: "before_change"``: the record brackets every change between two readings one
  poll apart, and shows the last reading before a gap. A heartbeat drops it (it says the
  same).

A sample recorded in the thinned regime carries ``kept`` (``first``, ``event``, ``change``,
``heartbeat``, ``before_change``, ``stop``) and ``unrecorded`` (how many readings of its
device were taken and not recorded since that device's previous sample): an auditor tells
a policy silence (heartbeats, each counting the readings it stands for) from a gap of
monitoring (which always has its own entries: ``monitoring_gap_*``, ``device_gap_*``, a
``recovery`` after a crash). Full-rate samples carry neither.

What a SIGKILL loses is what it lost before (samples not yet group-committed) plus the
held reading, which by construction differs from a recorded one by less than the
deadbands. Nothing is buffered to be written later than it was seen, except that one held
reading, written with its own ``at``; entries stay in the order they were appended.

The thinner sees entry data as the audit log records it (daemon/entries.py), so it compares
what the record would say; it never touches what the live sinks get (MQTT telemetry is
for watching the room live and is thinned by its own outbox under a broker outage). Pure:
no clock reads, no I/O; the service (daemon/service.py) asks it per reading.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from iortd.daemon.tracker import DeliverySnapshot, Phase
from iortd.daemon.tracker.machine import ACTIVE, TARGET_PHASE
from iortd.kernel.types import DeviceState

__all__ = [
    "DELIVERY_STATES",
    "Deadbands",
    "SamplePolicy",
    "Thinner",
    "changed",
    "policy_of",
    "room_active",
]

EntrySpec = tuple[str, dict[str, Any], str | None]

# Console states in which a delivery is being prepared, given or paused: those that ask
# the tracker for one of its delivery phases (one table, the tracker's).
DELIVERY_STATES = frozenset(state for state, phase in TARGET_PHASE.items() if phase in ACTIVE)

# Fields that say when, not what: never a change.
_TIME_FIELDS = frozenset({"at", "device_mono_ns", "kept", "unrecorded"})
# The reader's refresh counter moves at every measurement; a frozen one is the tracker's
# to judge (an event when it matters), so its movement is not a change.
_IGNORED = frozenset({"heartbeat"})


@dataclass(frozen=True, slots=True)
class Deadbands:
    """How far an analog value may move from its last recorded value before it counts
    as a change (absolute, in the value's unit). 0: every change."""

    kv: float = 0.5
    ua: float = 1.0
    dose_rate_gy_min: float = 0.01
    displacement_mm: float = 0.2
    tilt_deg: float = 0.2
    extra: float = 0.0

    def of(self, key: str) -> float | None:
        """The deadband of a recorded field, or None: compared exactly."""
        attr = "extra" if key.startswith("extra.") else _FIELD_DEADBAND.get(key)
        return None if attr is None else float(getattr(self, attr))


# The recorded fields that have a deadband, and which one; every other field is exact.
_FIELD_DEADBAND: Mapping[str, str] = {
    "kv": "kv",
    "ua": "ua",
    "dose_rate_gy_min": "dose_rate_gy_min",
    "displacement_mm": "displacement_mm",
    "displacement_magnitude_mm": "displacement_mm",
    "displacement_from_beam_on_mm": "displacement_mm",
    "peak_displacement_mm": "displacement_mm",
    "tilt_deg": "tilt_deg",
}


@dataclass(frozen=True, slots=True)
class SamplePolicy:
    """The ``[log]`` keys in force. ``idle_interval_s`` 0: every reading is recorded."""

    idle_interval_s: float = 60.0
    window_s: float = 60.0
    deadbands: Deadbands = field(default_factory=Deadbands)

    @property
    def thinning(self) -> bool:
        return self.idle_interval_s > 0


def _moved(old: Any, new: Any, band: float | None) -> bool:
    """Whether a recorded value changed: exactly, or beyond ``band`` for finite numbers
    (a number that becomes text, e.g. "nan", or None, is always a change)."""
    if band is None or band <= 0:
        return bool(old != new)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) != len(new) or any(
            _moved(a, b, band) for a, b in zip(old, new, strict=True)
        )
    if _finite(old) and _finite(new):
        return abs(float(new) - float(old)) > band
    return bool(old != new)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def changed(old: Mapping[str, Any], new: Mapping[str, Any], bands: Deadbands) -> str | None:
    """The first field in which ``new`` differs from ``old`` (the stream's last recorded
    sample) beyond its deadband, or None."""
    for key in sorted(old.keys() | new.keys()):
        if key in _TIME_FIELDS or key in _IGNORED:
            continue
        if key not in old or key not in new:
            return key
        a, b = old[key], new[key]
        if key == "extra" and isinstance(a, Mapping) and isinstance(b, Mapping):
            for name in sorted(a.keys() | b.keys()):
                if name not in a or name not in b or _moved(a[name], b[name], bands.extra):
                    return f"extra.{name}"
            continue
        if _moved(a, b, bands.of(key)):
            return key
    return None


@dataclass(slots=True)
class _Stream:
    last: dict[str, Any] | None = None  # the last recorded sample's data
    last_mono_ns: int = 0
    held: EntrySpec | None = None  # the newest reading not recorded
    held_mono_ns: int = 0
    unrecorded: int = 0  # readings not recorded since the last recorded one


class Thinner:
    """Decides, reading by reading, which samples the audit log gets (module docstring)."""

    def __init__(self, policy: SamplePolicy) -> None:
        self.policy = policy
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._active_until_ns: int | None = None
        self.recorded = 0
        self.thinned = 0

    def offer(
        self,
        entry: EntrySpec,
        mono_ns: int,
        *,
        active: bool,
        events: bool,
    ) -> list[EntrySpec]:
        """The entries to append now for one reading (its sample ``entry`` as
        daemon/entries.py builds it): none, the sample, or the held reading and then the
        sample. ``active``: the room is active at this reading; ``events``: the reading
        came with tracker events (those are appended before what this returns, after
        :meth:`flush`)."""
        kind, data, _ = entry
        stream = self._streams.setdefault((kind, str(data.get("device"))), _Stream())
        window_ns = round(self.policy.window_s * 1e9)
        if active:
            self._active_until_ns = mono_ns + window_ns
        reason = self._reason(stream, data, mono_ns, active=active, events=events)
        if reason is None:
            stream.held, stream.held_mono_ns = entry, mono_ns
            stream.unrecorded += 1
            self.thinned += 1
            return []
        out: list[EntrySpec] = []
        if stream.held is not None and reason != "heartbeat":
            out.append(self._mark(stream, stream.held, "before_change"))
        if reason == "full_rate":
            # Anything held went first (above): the count starts again.
            stream.unrecorded = 0
            out.append(entry)
        else:
            out.append(self._mark(stream, entry, reason))
        stream.held = None
        stream.last, stream.last_mono_ns = dict(out[-1][1]), mono_ns
        self.recorded += len(out)
        return out

    def flush(self, reason: str = "before_change") -> list[EntrySpec]:
        """Every held reading (oldest first), to be appended now: before a tracker event,
        and at a clean stop (``reason`` "stop")."""
        held = [(s.held_mono_ns, s, s.held) for s in self._streams.values() if s.held is not None]
        out: list[EntrySpec] = []
        for mono_ns, stream, entry in sorted(held, key=lambda x: x[0]):
            out.append(self._mark(stream, entry, reason))
            stream.last, stream.last_mono_ns = dict(out[-1][1]), mono_ns
            stream.held = None
        self.recorded += len(out)
        return out

    def _reason(
        self, stream: _Stream, data: Mapping[str, Any], mono_ns: int, *, active: bool, events: bool
    ) -> str | None:
        if not self.policy.thinning or active:
            return "full_rate"
        if self._active_until_ns is not None and mono_ns <= self._active_until_ns:
            return "full_rate"  # the window after the last active reading
        if stream.last is None:
            return "first"
        if events:
            return "event"
        if mono_ns < stream.last_mono_ns or changed(stream.last, data, self.policy.deadbands):
            return "change"  # time going backwards is a change too (the tracker judges it)
        if mono_ns - stream.last_mono_ns >= round(self.policy.idle_interval_s * 1e9):
            return "heartbeat"
        return None

    def _mark(self, stream: _Stream, entry: EntrySpec, reason: str) -> EntrySpec:
        kind, data, did = entry
        held = entry is stream.held
        # The held reading was counted as unrecorded when it was held: it is recorded now.
        n = stream.unrecorded - (1 if held else 0)
        stream.unrecorded = 0
        return kind, {**data, "kept": reason, "unrecorded": n}, did


def policy_of(log: Any) -> SamplePolicy:
    """The policy of a config's ``[log]`` table (daemon/config/model.py ``LogConfig``)."""
    b = log.sample_deadband
    return SamplePolicy(
        idle_interval_s=log.idle_sample_interval_s,
        window_s=log.sample_window_s,
        deadbands=Deadbands(
            kv=b.kv,
            ua=b.ua,
            dose_rate_gy_min=b.dose_rate_gy_min,
            displacement_mm=b.displacement_mm,
            tilt_deg=b.tilt_deg,
            extra=b.extra,
        ),
    )


def room_active(
    snapshot: DeliverySnapshot | None, phase: Phase, console: DeviceState | None
) -> bool:
    """Whether the room is active (samples at full rate): a delivery open in the tracker,
    the tracker in a delivery phase, or the console reporting a delivery state."""
    return (
        (snapshot is not None and snapshot.termination is None)
        or phase in ACTIVE
        or console in DELIVERY_STATES
    )
