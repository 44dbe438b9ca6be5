"""Dose accounting of one delivery: segments, interruptions, gaps, beam-on and elapsed time.

The record the tracker keeps while a delivery is open, and the arithmetic on it. No events
and no alarms here: the tracker decides what a number means (a contradiction, dose with
the beam off) and says so; this module only keeps the numbers exact:
- the segments tile the delivered dose with no gap and no double count (DICOM PS3.3
  C.8.8.21.2.2): each begins where the last ended, and dose seen with the beam reported
  off goes in a ``beam_off`` segment of its own (merged while it keeps rising);
- beam-on is the console's own timer, or what the host saw with the beam on between two
  consecutive readings when that is more; time inside a monitoring gap is never counted;
- elapsed runs from the first beam as the console's timer places it, and is never shorter
  than beam-on (one time base on every display).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from iortd.daemon.tracker.events import (
    NS,
    DeliverySnapshot,
    Gap,
    Interruption,
    Phase,
    Segment,
)
from iortd.daemon.tracker.settings import TrackerSettings
from iortd.kernel.types import ApplicatorIdentity, DeviceState, SourceReading, TerminationStatus

__all__ = ["DeliveryRecord", "first_beam", "hms"]


def first_beam(r: SourceReading) -> int:
    """When the beam first came on, on the host's clock: the console's own timer says it
    has been on ``beam_on_s`` by this reading, so it came on at least that long ago (the
    start fell between two polls). Elapsed time and beam-on time then share one time
    base, and elapsed is never shorter than beam-on."""
    return r.mono_ns - max(round(r.beam_on_s * NS), 0)


def hms(t: datetime | None) -> str:
    return "?" if t is None else f"{t:%H:%M:%S.%f}"[:-3]


# The console states in which it has finished with (or left) a selection.
_CONSOLE_DONE = frozenset(
    {
        DeviceState.TERMINATED,
        DeviceState.STANDBY,
        DeviceState.OFF,
        DeviceState.FAULT,
        DeviceState.EMERGENCY_STOP,
    }
)


@dataclass(slots=True)
class DeliveryRecord:
    delivery_id: str
    joined: bool
    started_mono_ns: int
    started_utc: datetime
    preset_gy: float
    planned_time_s: float | None
    applicator: ApplicatorIdentity | None
    simulated: bool
    primary_gy: float = 0.0
    secondary_gy: float = 0.0
    dose_rate_gy_min: float = 0.0
    device_beam_on_s: float = 0.0
    observed_beam_on_ns: int = 0
    first_beam_mono_ns: int | None = None
    end_mono_ns: int | None = None
    segments: list[Segment] = field(default_factory=list)
    interruptions: list[Interruption] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    termination: TerminationStatus | None = None
    termination_reason: str | None = None
    dose_at_close_gy: float | None = None

    # ---- time and rates ---------------------------------------------------------------

    @property
    def beam_on_s(self) -> float:
        """Beam-on time: the console's own timer, or what the host saw with the beam on
        between two consecutive readings when that is more (a console timer that lags).
        Time inside a monitoring gap is never counted: it is unknown, not beam-on."""
        return max(self.device_beam_on_s, self.observed_beam_on_ns / NS)

    def expected_rate(self, s: TrackerSettings) -> float | None:
        if s.expected_rate_gy_min is not None:
            return s.expected_rate_gy_min
        if self.planned_time_s:
            return self.preset_gy / (self.planned_time_s / 60.0)
        return None

    def planned_time(self, s: TrackerSettings) -> float | None:
        rate = self.expected_rate(s)
        return None if not rate else self.preset_gy / rate * 60.0

    def backup_limit_s(self, s: TrackerSettings) -> float | None:
        planned = self.planned_time(s)
        return planned * (1 + s.backup_timer_margin_rel) if planned else None

    def channel_limit_gy(self, s: TrackerSettings) -> float:
        """How far apart the two dose channels may be (25 Pa. Code §228.66 requires two
        independent channels; the limit is a per-site setting)."""
        return max(s.dose_channel_abs_gy, s.dose_channel_rel * self.primary_gy)

    # ---- segments ---------------------------------------------------------------------

    def open_segment(self, kind: str, mono: int) -> None:
        self.segments.append(Segment(kind, self.primary_gy, self.primary_gy, mono, None))

    def close_segment(self, mono: int) -> None:
        if self.segments and self.segments[-1].end_mono_ns is None:
            self.segments[-1] = replace(self.segments[-1], end_gy=self.primary_gy, end_mono_ns=mono)

    def add_dose_segment(self, kind: str, upto_gy: float, mono: int) -> None:
        """Dose counted outside observed beam (``unmonitored``, ``in_previous_record``), as
        one stretch up to ``upto_gy``."""
        self.segments.append(Segment(kind, self.primary_gy, upto_gy, mono, mono))
        self.primary_gy = upto_gy

    def add_beam_off_dose(self, r: SourceReading) -> float:
        """The console says the beam is off but its dose count moved. Keep the dose in a
        segment of its own (merged while it keeps rising) so the tiling stays exact;
        return the rise."""
        rise = r.dose_primary_gy - self.primary_gy
        last = self.segments[-1] if self.segments else None
        if last is not None and last.kind == "beam_off" and last.end_gy == self.primary_gy:
            self.segments[-1] = replace(last, end_gy=r.dose_primary_gy, end_mono_ns=r.mono_ns)
        else:
            self.segments.append(
                Segment("beam_off", self.primary_gy, r.dose_primary_gy, r.mono_ns, r.mono_ns)
            )
        self.primary_gy = r.dose_primary_gy
        return rise

    def take(self, r: SourceReading, counted_ns: int) -> None:
        """Fold a believed reading's numbers in (the caller has checked they do not
        contradict the record); ``counted_ns`` is beam-on the host saw since the last."""
        if self.first_beam_mono_ns is None:
            self.preset_gy = r.preset_gy  # the selection may still be edited before beam-on
            self.planned_time_s = r.planned_time_s or self.planned_time_s
            self.applicator = r.applicator or self.applicator
        self.primary_gy = r.dose_primary_gy
        self.secondary_gy = r.dose_secondary_gy
        if self.segments and self.segments[-1].end_mono_ns is None:
            self.segments[-1] = replace(self.segments[-1], end_gy=self.primary_gy)
        self.dose_rate_gy_min = r.dose_rate_gy_min if r.state is DeviceState.IRRADIATING else 0.0
        self.device_beam_on_s = max(self.device_beam_on_s, r.beam_on_s)
        self.observed_beam_on_ns += counted_ns

    def after_close(self, r: SourceReading) -> str | None:
        """A reading after the delivery was closed (the caller has kept any dose that rose
        as beam-off dose). The console keeps the selection's counts until a new selection;
        when it ends (or leaves) a selection the monitor had already closed and dose was
        given since, the reason for an appended correction, else None."""
        self.secondary_gy = max(self.secondary_gy, r.dose_secondary_gy)
        self.device_beam_on_s = max(self.device_beam_on_s, r.beam_on_s)
        self.dose_rate_gy_min = 0.0
        closed_at = self.dose_at_close_gy
        if r.state not in _CONSOLE_DONE or closed_at is None or self.primary_gy <= closed_at:
            return None
        self.dose_at_close_gy = self.primary_gy
        return (
            f"the console ended the selection after the monitor closed the delivery "
            f"({self.termination}); {self.primary_gy - closed_at:.4f} Gy more was given "
            f"after closing (console: {r.state}"
            + (f" {r.termination}" if r.termination else "")
            + ")"
        )

    # ---- the end ----------------------------------------------------------------------

    def normal_end_doubt(self, s: TrackerSettings) -> str | None:
        """Why a console's NORMAL end is not one, or None. The end-of-delivery tolerances
        are checked on the final values: below the preset by more than the stop accuracy,
        the channels apart, or the backup timer overrun."""
        floor = self.preset_gy * (1 - s.stop_accuracy_rel)
        if self.primary_gy < floor:
            return (
                f"console reported a normal end at {self.primary_gy:.4f} Gy, below "
                f"{floor:.4f} Gy (preset {self.preset_gy} Gy - stop accuracy)"
            )
        limit = self.channel_limit_gy(s)
        backup = self.backup_limit_s(s)
        beam_on = self.beam_on_s
        doubt = None
        if abs(self.primary_gy - self.secondary_gy) > limit:
            doubt = (
                f"dose channels disagree at the end (primary {self.primary_gy:.4f} Gy, "
                f"secondary {self.secondary_gy:.4f} Gy, limit {limit:.4f} Gy)"
            )
        elif backup is not None and beam_on > backup:
            doubt = f"beam-on {beam_on:.1f} s ran past the backup-timer limit {backup:.1f} s"
        return None if doubt is None else f"console reported a normal end but {doubt}"

    def end_in_gap(self, gap: Gap, gap_beam_on_s: float, mono: int) -> tuple[int, str]:
        """The end fell inside a monitoring gap: it happened after the last reading before
        the gap, and at least as much later as the console's beam-on timer advanced across
        it; that earliest end bounds elapsed time, not the moment the end was first seen.
        Returns the end and what the reason adds."""
        advance = max(self.device_beam_on_s - gap_beam_on_s, 0.0)
        end = min(gap.start_mono_ns + round(advance * NS), mono)
        return end, (
            f"; the end fell inside a monitoring gap ({hms(gap.start_utc)} to "
            f"{hms(gap.end_utc)} UTC): its time is known only to within the gap"
        )

    def close(self, status: TerminationStatus, reason: str, end: int) -> None:
        self.close_segment(end)
        if self.interruptions and self.interruptions[-1].end_mono_ns is None:
            self.interruptions[-1] = replace(self.interruptions[-1], end_mono_ns=end)
        self.termination = status
        self.termination_reason = reason
        self.end_mono_ns = end
        self.dose_at_close_gy = self.primary_gy

    # ---- the view ---------------------------------------------------------------------

    def snapshot(self, phase: Phase, s: TrackerSettings, now: int) -> DeliverySnapshot:
        expected = self.expected_rate(s)
        planned = self.planned_time(s)
        remaining = max(self.preset_gy - self.primary_gy, 0.0)
        rate = self.dose_rate_gy_min if self.dose_rate_gy_min > 0 else (expected or 0.0)
        est = None
        if self.termination is not None:
            est = 0.0
        elif rate > 0:
            est = remaining / rate * 60.0
        end = self.end_mono_ns if self.end_mono_ns is not None else now
        first = self.first_beam_mono_ns
        elapsed = 0.0 if first is None else max(end - first, 0) / NS
        beam_on = self.beam_on_s
        # One time base: a console timer that runs a little fast cannot put beam-on ahead
        # of elapsed (elapsed includes every interruption, so it is never the shorter).
        elapsed = max(elapsed, beam_on)
        return DeliverySnapshot(
            delivery_id=self.delivery_id,
            phase=phase,
            joined_in_progress=self.joined,
            preset_gy=self.preset_gy,
            delivered_primary_gy=self.primary_gy,
            delivered_secondary_gy=self.secondary_gy,
            remaining_gy=remaining,
            dose_rate_gy_min=self.dose_rate_gy_min,
            expected_rate_gy_min=expected,
            planned_time_s=planned,
            backup_timer_limit_s=(planned * (1 + s.backup_timer_margin_rel) if planned else None),
            beam_on_s=beam_on,
            elapsed_s=elapsed,
            estimated_remaining_s=est,
            applicator=self.applicator,
            segments=tuple(self.segments),
            interruptions=tuple(self.interruptions),
            gaps=tuple(self.gaps),
            termination=self.termination,
            termination_reason=self.termination_reason,
            started_utc=self.started_utc,
            simulated=self.simulated,
        )
