"""The dose plot: accumulated dose on both channels and the dose rate against time; and,
for a delivery with an applicator reader, its displacement trace with the tolerance line.

Drawn with matplotlib's object API (``Figure``, the Agg canvas; no pyplot state, no
display), as PNG for the PDF and SVG for the HTML. Byte-stable: a fixed SVG hash salt,
text drawn as paths, no date or software version in the images' metadata. Interruptions
are shaded amber; monitoring gaps red and hatched, with no line drawn across them
(nothing was observed there).
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from iortd.audit.record import DeliveryRecord
from iortd.audit.report.model import number, parse_ts

__all__ = ["PLOT_DPI", "PLOT_SIZES", "plot_png", "plot_svg"]

PLOT_DPI = 200
# Figure sizes (inches) by plot kind: the PDF scales each image to the text width.
PLOT_SIZES = {"dose": (7.2, 4.4), "displacement": (7.2, 2.6)}


def _figure(rec: DeliveryRecord) -> Any:
    t0 = parse_ts(rec.started) or parse_ts(
        rec.samples[0]["data"].get("at") if rec.samples else None
    )

    def minutes(ts: Any) -> float | None:
        t = parse_ts(ts)
        return None if t is None or t0 is None else (t - t0).total_seconds() / 60.0

    xs: list[float] = []
    p: list[float | None] = []
    sec: list[float | None] = []
    rate: list[float | None] = []
    exp: list[float | None] = []
    s = rec.summary
    exp_rate = number(s.get("expected_rate_gy_min"))
    preset = number(rec.preset_gy)
    base: tuple[float, float] | None = None
    for e in rec.samples:
        d = e["data"]
        x = minutes(d.get("at"))
        if x is None:
            continue
        xs.append(x)
        p.append(number(d.get("dose_primary_gy")))
        sec.append(number(d.get("dose_secondary_gy")))
        rate.append(number(d.get("dose_rate_gy_min")))
        beam = number(d.get("beam_on_s"))
        if base is None and d.get("state") == "IRRADIATING" and beam is not None:
            base = (number(d.get("dose_primary_gy")) or 0.0, beam)
        if base is not None and beam is not None and exp_rate:
            value = base[0] + exp_rate * (beam - base[1]) / 60.0
            exp.append(min(value, preset) if preset else value)
        else:
            exp.append(None)

    # No line across a monitoring gap: nothing was observed there.
    gap_spans = [
        (minutes(i.start), minutes(i.end)) for i in rec.intervals() if i.kind == "gap" and i.end
    ]
    nan = float("nan")
    for a, z in sorted(
        ((a, z) for a, z in gap_spans if a is not None and z is not None), reverse=True
    ):
        k = next((n for n in range(1, len(xs)) if xs[n - 1] <= a and xs[n] >= z), None)
        if k is not None:
            for series in (p, sec, rate, exp):
                series.insert(k, nan)
            xs.insert(k, a)

    fig = Figure(figsize=PLOT_SIZES["dose"], layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    for iv in rec.intervals():
        a0 = minutes(iv.start)
        z0 = minutes(iv.end) if iv.end else (xs[-1] if xs else None)
        if a0 is None or z0 is None:
            continue
        for ax in (top, bottom):
            if iv.kind == "gap":
                ax.axvspan(
                    a0, z0, facecolor="#d62728", alpha=0.18, hatch="///", edgecolor="#d62728", lw=0
                )
            else:
                ax.axvspan(a0, z0, facecolor="#ff9f1c", alpha=0.25, lw=0)
    top.plot(xs, p, color="#1f4e79", lw=1.6, label="primary channel")
    top.plot(xs, sec, color="#2ca02c", lw=1.0, ls="--", label="secondary channel")
    if any(v is not None for v in exp):
        top.plot(xs, exp, color="#555555", lw=1.0, ls=":", label="expected (rate x beam-on)")
    if preset:
        top.axhline(preset, color="#7f7f7f", lw=0.8, ls="-.", label=f"preset {preset:g} Gy")
    top.set_ylabel("accumulated dose (Gy)")
    top.grid(True, lw=0.3, alpha=0.6)
    bottom.step(xs, rate, where="post", color="#1f4e79", lw=1.2, label="dose rate")
    if exp_rate:
        bottom.axhline(exp_rate, color="#555555", lw=1.0, ls=":", label=f"expected {exp_rate:.3f}")
    bottom.set_ylabel("dose rate (Gy/min)")
    bottom.set_xlabel("time since the delivery started (min)")
    bottom.grid(True, lw=0.3, alpha=0.6)
    bottom.set_ylim(bottom=0)
    top.set_ylim(bottom=0)
    # One legend above both panels: it never hides a curve.
    handles, _ = top.get_legend_handles_labels()
    handles += bottom.get_legend_handles_labels()[0]
    kinds = {i.kind for i in rec.intervals()}
    if "interruption" in kinds:
        handles.append(Patch(facecolor="#ff9f1c", alpha=0.25, label="interruption"))
    if "gap" in kinds:
        handles.append(
            Patch(
                facecolor="#d62728",
                alpha=0.18,
                hatch="///",
                edgecolor="#d62728",
                label="monitoring gap",
            )
        )
    fig.legend(handles=handles, loc="outside upper center", ncols=4, fontsize=7, frameon=False)
    return fig


def _displacement_figure(rec: DeliveryRecord) -> Any:
    """The applicator reader's displacement (from the lock and from beam-on) against the
    same time axis as the dose plot, the tolerance in force as a dashed line, the reader's
    gaps shaded red and hatched (no line across them)."""
    t0 = parse_ts(rec.started) or parse_ts(
        rec.applicator_samples[0]["data"].get("at") if rec.applicator_samples else None
    )
    xs: list[float] = []
    lock: list[float] = []
    beam: list[float] = []
    for e in rec.applicator_samples:
        d = e["data"]
        t = parse_ts(d.get("at"))
        if t is None or t0 is None:
            continue
        xs.append((t - t0).total_seconds() / 60.0)
        v = number(d.get("displacement_magnitude_mm"))
        w = number(d.get("displacement_from_beam_on_mm"))
        lock.append(float("nan") if v is None else v)
        beam.append(float("nan") if w is None else w)
    fig = Figure(figsize=PLOT_SIZES["displacement"], layout="constrained")
    ax = fig.subplots()
    gaps: list[tuple[float, float]] = []
    for e in rec.events:
        if e.get("type") != "device_gap_ended":
            continue
        ga, gz = parse_ts(e["data"].get("start")), parse_ts(e["data"].get("end"))
        if ga is None or gz is None or t0 is None:
            continue
        gaps.append(((ga - t0).total_seconds() / 60.0, (gz - t0).total_seconds() / 60.0))
    for a, z in sorted(gaps, reverse=True):
        ax.axvspan(a, z, facecolor="#d62728", alpha=0.18, hatch="///", edgecolor="#d62728", lw=0)
        k = next((n for n in range(1, len(xs)) if xs[n - 1] <= a and xs[n] >= z), None)
        if k is not None:
            xs.insert(k, a)
            lock.insert(k, float("nan"))
            beam.insert(k, float("nan"))
    ax.plot(xs, lock, color="#1f4e79", lw=1.4, label="from the stand's lock")
    ax.plot(xs, beam, color="#2ca02c", lw=1.0, ls="--", label="from beam-on")
    tol = number(rec.tolerances.get("applicator_displacement_mm"))
    if tol is not None:
        ax.axhline(tol, color="#d62728", lw=1.0, ls="-.", label=f"tolerance {tol:g} mm")
    ax.set_ylabel("displacement (mm)")
    ax.set_xlabel("time since the delivery started (min)")
    ax.grid(True, lw=0.3, alpha=0.6)
    ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0]
    if gaps:
        handles.append(
            Patch(
                facecolor="#d62728",
                alpha=0.18,
                hatch="///",
                edgecolor="#d62728",
                label="reader gap",
            )
        )
    fig.legend(handles=handles, loc="outside upper center", ncols=4, fontsize=7, frameon=False)
    return fig


_FIGURES = {"dose": _figure, "displacement": _displacement_figure}

# Typed as Any: matplotlib's stubs accept only literal rc keys.
_RC: Any = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "svg.hashsalt": "iortd-report",
    "svg.fonttype": "path",
    "path.simplify": False,
}


def plot_png(rec: DeliveryRecord, kind: str = "dose") -> bytes:
    with rc_context(_RC):
        fig = _FIGURES[kind](rec)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return buf.getvalue()


def plot_svg(rec: DeliveryRecord, kind: str = "dose") -> str:
    with rc_context(_RC):
        fig = _FIGURES[kind](rec)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]
