"""The tolerances the tracker judges by: the single source of every default.

The public literature gives no kV, dual-channel, dose-rate or overtime tolerances for these
devices (docs/domain.md), so each is a per-site setting and the values in force are written
to the audit log. The defaults live here and only here: the config's ``[tolerances]`` table
takes its defaults from :class:`TrackerSettings` (daemon/config/model.py), and docs/alarms.md is
checked against them by a test. The tracker never reads the config; the daemon builds a
``TrackerSettings`` from it (``iortd.daemon.config.tracker_settings``).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

__all__ = ["STALE_AFTER_POLLS", "TrackerSettings", "setting_default"]

# The config states staleness in poll periods (``stale_after_polls``); the daemon turns it
# into ``stale_after_s`` with the source's poll interval and the clock's speed.
STALE_AFTER_POLLS = 3


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    """Tolerances in force (per-device settings; the daemon logs them)."""

    stale_after_s: float
    expected_rate_gy_min: float | None = None
    dose_channel_rel: float = 0.05
    dose_channel_abs_gy: float = 0.05
    dose_rate_rel: float = 0.10
    rate_settle_s: float = 10.0
    overdose_rel: float = 0.02
    stop_accuracy_rel: float = 0.01
    backup_timer_margin_rel: float = 0.10
    # Tube voltage while the beam is on: both reference classes (INTRABEAM-like, Xoft
    # Axxent-like) run at 50 kV (Radiat Oncol 2007;2:11; Xoft clinical reports). The band
    # is 10 % of that: wider than a console's own kV interlock is likely to be (the
    # simulated profiles trip at 5 %), so the monitor's alarm is an independent backstop
    # for a console that kept irradiating out of tolerance, not a second copy of its
    # interlock; the alarm's 2 s hold covers the ramp at beam-on and single noisy samples.
    nominal_kv: float = 50.0
    kv_tolerance_kv: float = 5.0
    delivery_id_prefix: str = "D"
    # The applicator reader and stand (issue 16): how far the applicator's tip may move
    # (mm, from the stand's lock or from beam-on) and tilt (degrees) with the beam on. No
    # default on purpose: the literature gives no public figure, so a site that configures
    # a reader must state its own (the config refuses one without them). None: no reader.
    applicator_displacement_mm: float | None = None
    applicator_tilt_deg: float | None = None
    # How long (clock seconds, from the tracker's first input) the reader may take to give
    # its first reading before "no reading from the reader yet" alarms with the beam off:
    # at start the source often answers first. Not a tolerance a site sets: the daemon
    # derives it from the reader's own timeout and poll period (its connect, identify and
    # first read). With the beam on there is no grace. None: no grace at all.
    applicator_first_reading_s: float | None = None


def setting_default(name: str) -> float:
    """The default of one numeric tolerance, for the config to declare its own with."""
    for f in fields(TrackerSettings):
        if f.name == name and f.default is not MISSING and isinstance(f.default, float):
            return f.default
    raise KeyError(f"TrackerSettings has no numeric default named {name!r}")
