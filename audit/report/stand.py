"""The report's "Applicator and stand" section (issue 16), when the log has a reader.

What the applicator reader said about this delivery: the applicator it read at beam-on,
the movement tolerances in force (the logged config), the peaks of displacement (from the
stand's lock and from beam-on) and tilt, every stand event with its device time (the
monitor's own applicator interlock, re-locks, the applicator alarms, the reader's gaps),
and, when there are readings, the displacement trace with the tolerance line. A delivery
without a reader gets no section, so its report is what it was before.
"""

from __future__ import annotations

from typing import Any

from iortd.audit.applicator import ApplicatorSide, applicator_side
from iortd.audit.export import describe, fmt_value
from iortd.audit.record import DeliveryRecord
from iortd.audit.report.model import Block, Heading, KeyValues, Para, Plot, Table, when

__all__ = ["stand_blocks"]


def _mm(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} mm"


def _deg(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}°"


def _identity(a: Any) -> str:
    if not isinstance(a, dict):
        return "not read at beam-on"
    return (
        f"{a.get('type', '—')} {fmt_value(a.get('diameter_mm')) or '—'} mm, "
        f"s/n {a.get('serial', '—')}"
    )


def _over(peak: float | None, tol: float | None) -> str:
    if peak is None or tol is None:
        return ""
    return " (beyond tolerance)" if peak > tol else " (within tolerance)"


def stand_blocks(rec: DeliveryRecord) -> list[Block]:
    side = applicator_side(rec)
    return [] if side is None else _blocks(rec, side)


def _blocks(rec: DeliveryRecord, side: ApplicatorSide) -> list[Block]:
    at_on = side.at_beam_on or {}
    tol_d, tol_t = side.displacement_tolerance_mm, side.tilt_tolerance_deg
    out: list[Block] = [Heading("Applicator and stand")]
    out.append(
        KeyValues(
            [
                ("Applicator reader", str(side.device or "—")),
                ("Applicator at beam-on (reader)", _identity(side.identity)),
                (
                    "At beam-on",
                    f"displacement {_mm(number_or_none(at_on.get('displacement_mm')))}, "
                    f"tilt {_deg(number_or_none(at_on.get('tilt_deg')))}"
                    if at_on
                    else "no applicator_at_beam_on entry",
                ),
                (
                    "Tolerances in force (config)",
                    f"displacement {_mm(tol_d)}, tilt {_deg(tol_t)}",
                ),
                (
                    "Peak displacement from the stand's lock",
                    _mm(side.peak_from_lock_mm) + _over(side.peak_from_lock_mm, tol_d),
                ),
                (
                    "Peak displacement from beam-on",
                    _mm(side.peak_from_beam_on_mm) + _over(side.peak_from_beam_on_mm, tol_d),
                ),
                ("Peak tilt", _deg(side.peak_tilt_deg) + _over(side.peak_tilt_deg, tol_t)),
                ("Reader readings", str(side.samples)),
                (
                    "Reader gaps",
                    "; ".join(f"{when(a)} to {when(z)}: {c}" for a, z, c in side.gaps)
                    if side.gaps
                    else "none",
                ),
            ]
        )
    )
    out.append(
        Table(
            ["seq", "time", "stand event"],
            [[str(e["seq"]), when(e["data"].get("at")), describe(e)] for e in side.events],
            [0.07, 0.25, 0.68],
        )
        if side.events
        else Para("No stand event is recorded for this delivery.", "note")
    )
    if side.samples:
        out.append(Plot("Applicator displacement against time", kind="displacement"))
        out.append(
            Para(
                "Displacement of the applicator's tip as the reader reported it: from the "
                "stand's lock (magnitude) and from beam-on; the dashed line is the tolerance "
                "in force. Shaded red: the reader's gaps (no readings).",
                "note",
            )
        )
    return out


def number_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
