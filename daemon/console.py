"""The demo's live console view: a dose progress bar, state, times and interlocks.

On a terminal it redraws one status line in place; otherwise (CI, a pipe) it prints a
line at each 10 % of the preset so that logs stay short. Events (phase changes, alarms,
gaps, the checks before beam-on, the end) are always printed on lines of their own.

A :class:`~iortd.daemon.sinks.Sink` like any other: it runs behind its own queue
(:mod:`iortd.daemon.sink_queue`), so a terminal that cannot keep up (a paused ``less``, a
slow SSH link) delays only the view, never the record or the live stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from iortd.daemon.sinks import Sample, Sink
from iortd.daemon.tracker import (
    AlarmCleared,
    AlarmRaised,
    ApplicatorRelocked,
    DeliveryAmended,
    DeliverySnapshot,
    DeliveryStarted,
    DeviceGapEnded,
    DeviceGapStarted,
    MonitoringGapEnded,
    MonitoringGapStarted,
    MonitorInterlockChanged,
    PhaseChanged,
    Terminated,
    TrackerEvent,
    VerificationChecked,
)
from iortd.kernel.types import DeviceIdentity, InterlockState

__all__ = ["ConsoleView", "format_duration", "progress_bar"]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = max(round(seconds), 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _check_line(v: Mapping[str, Any]) -> str:
    """One check of the console against the prescription (docs/prescriptions.md)."""
    reasons = v.get("reasons") or []
    line = f"  check before beam-on ({v.get('trigger')}): {v.get('outcome')}"
    line += f" [{', '.join(map(str, reasons))}]" if reasons else ""
    if v.get("treatment_id") is not None:
        line += f": {v['treatment_id']}/{v.get('plan_id')}"
        for key, word in (("planned_time_s", "planned"), ("expected_time_s", "expected")):
            if isinstance(v.get(key), int | float):
                line += f", {word} {v[key]:.0f} s"
    return line


def progress_bar(fraction: float, width: int = 30) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ConsoleView(Sink):
    name = "console"

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self._out = out
        self._live = live
        self._last_decile = -1
        self._line_open = False

    def _println(self, text: str) -> None:
        if self._line_open:
            self._out.write("\r\x1b[2K")
            self._line_open = False
        self._out.write(text + "\n")
        self._out.flush()

    async def started(self, device: str, identity: DeviceIdentity) -> None:
        sim = " [SIMULATED]" if identity.simulated else ""
        self._println(
            f"{device}: {identity.manufacturer} {identity.model} s/n {identity.serial}{sim}"
        )

    async def sample(self, sample: Sample) -> None:
        d = sample.delivery
        r = sample.reading
        if d is None:
            line = f"{r.state:<13} waiting for a plan"
            fraction = 0.0
        else:
            fraction = d.delivered_primary_gy / d.preset_gy if d.preset_gy else 0.0
            bad = [f"{k}={v}" for k, v in sample.interlocks.items() if v is not InterlockState.OK]
            il = "interlocks: all clear" if sample.all_clear else "interlocks: " + " ".join(bad)
            line = (
                f"{progress_bar(fraction)} {d.delivered_primary_gy:6.2f}/{d.preset_gy:.2f} Gy "
                f"(2nd {d.delivered_secondary_gy:6.2f})  {d.phase:<11} "
                f"{d.dose_rate_gy_min:5.3f} Gy/min  beam-on {format_duration(d.beam_on_s)}  "
                f"elapsed {format_duration(d.elapsed_s)}  "
                f"remaining {format_duration(d.estimated_remaining_s)}  {il}"
            )
        if r.simulated:
            line = "SIM " + line
        if self._live:
            self._out.write("\r\x1b[2K" + line)
            self._out.flush()
            self._line_open = True
        else:
            decile = int(fraction * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self._println(line)

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        for ev in events:
            match ev:
                case DeliveryStarted():
                    self._last_decile = -1
                    self._println(f"delivery {ev.delivery_id}: preset {ev.preset_gy:.2f} Gy")
                case PhaseChanged():
                    self._println(f"  {ev.src} -> {ev.dst} ({ev.cause})")
                case AlarmRaised():
                    self._println(f"  ALARM {ev.alarm.severity.upper()}: {ev.alarm.message}")
                case AlarmCleared():
                    self._println(f"  alarm cleared: {ev.alarm.key}")
                case MonitoringGapStarted():
                    self._println(f"  MONITORING GAP: {ev.gap.cause}")
                case MonitoringGapEnded():
                    self._println("  monitoring resumed")
                case Terminated():
                    s = ev.summary
                    self._println(
                        f"delivery {ev.delivery_id} terminated {ev.status} ({ev.reason}): "
                        f"primary {s.delivered_primary_gy:.3f} Gy, secondary "
                        f"{s.delivered_secondary_gy:.3f} Gy of {s.preset_gy:.2f} Gy; beam-on "
                        f"{format_duration(s.beam_on_s)}, elapsed {format_duration(s.elapsed_s)}, "
                        f"{len(s.interruptions)} interruption(s), {len(s.gaps)} gap(s)"
                    )
                case DeliveryAmended():
                    self._println(f"delivery {ev.delivery_id} amended: {ev.reason}")
                case MonitorInterlockChanged():
                    self._println(
                        f"  {ev.device}: monitor's {ev.interlock} interlock {ev.new} ({ev.cause})"
                    )
                case DeviceGapStarted():
                    self._println(f"  {ev.device}: MONITORING GAP of this device: {ev.gap.cause}")
                case DeviceGapEnded():
                    self._println(f"  {ev.device}: monitoring resumed")
                case ApplicatorRelocked():
                    self._println(f"  {ev.device}: stand locked again (the peak is kept)")
                case VerificationChecked():
                    self._println(_check_line(ev.public))
                case _:
                    pass

    async def checkpoint(self, note: str) -> None:
        origin, count = note.split("\n", 2)[:2]
        self._println(f"  audit checkpoint signed: {count} entries ({origin})")

    async def notice(self, severity: str, message: str) -> None:
        self._println(f"  {severity.upper()}: {message}")

    async def aclose(self) -> None:
        if self._line_open:
            self._out.write("\n")
            self._out.flush()
            self._line_open = False
