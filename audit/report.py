"""The delivery report for auditors and physicists: PDF (reportlab) and HTML.

Both are rendered from one document model built from a DeliveryRecord (what the verified
log holds, nothing else), so the two say the same. The plot is drawn by matplotlib
(Agg, no display): embedded in the PDF as a PNG at print resolution, in the HTML as SVG.

Deterministic: no clock (the PDF's creation date is the delivery's last entry's time),
reportlab's invariant mode (fixed document id), fonts embedded from a pinned package
(the DejaVu faces matplotlib ships), a fixed SVG hash salt, no software-version metadata
in the images. The same log and the same pinned libraries give the same bytes.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from iortd.audit.dicom import segments_with_context
from iortd.audit.export import describe
from iortd.audit.record import DeliveryRecord
from iortd.kernel.version import __version__

__all__ = ["html_report", "pdf_report", "plot_png", "plot_svg"]

PLOT_DPI = 200
UNVOUCHED_HEAD = "NOT VERIFIED: UNVOUCHED entries (not covered by any signature as genuine):"


# ---- formatting ---------------------------------------------------------------------------


def _f(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def gy(x: Any, digits: int = 3) -> str:
    v = _f(x)
    return "—" if v is None else f"{v:.{digits}f} Gy"


def secs(x: Any) -> str:
    """Seconds as m:ss (h:mm:ss) and the exact seconds."""
    v = _f(x)
    if v is None:
        return "—"
    s = max(round(v), 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    clock = f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
    return f"{clock} ({v:.1f} s)"


def when(ts: Any) -> str:
    """A log time as shown: date, time to the millisecond, UTC."""
    if not isinstance(ts, str) or len(ts) < 19:
        return "—"
    return f"{ts[:10]} {ts[11:23]} UTC"


def _parse(ts: Any) -> datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts)
    except ValueError:
        return None


def _pct(a: Any, b: Any) -> str:
    x, y = _f(a), _f(b)
    if x is None or not y:
        return "—"
    return f"{(x - y) / y * 100:+.2f} %"


# ---- the document model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Para:
    text: str
    style: str = "body"  # body, note, mono, warn


@dataclass(frozen=True)
class KeyValues:
    rows: Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    widths: Sequence[float]  # fractions of the text width
    mono_cols: Sequence[int] = ()


@dataclass(frozen=True)
class Plot:
    caption: str


@dataclass(frozen=True)
class SignOff:
    pass


Block = Heading | Para | KeyValues | Table | Plot | SignOff


@dataclass
class ReportDoc:
    title: str
    subtitle: str
    status_line: str
    blocks: list[Block] = field(default_factory=list)
    footer: tuple[str, ...] = ()
    stamp: str | None = None  # set when the log is not intact (--allow-unverified)
    stamp_head: str = "NOT VERIFIED: the audit log is not intact at"
    created: str | None = None  # the delivery's last entry ts
    simulated: bool = False


def _ack(rec: DeliveryRecord, e: dict[str, Any]) -> str:
    """Who acknowledged an event: an operator_action naming its alarm key or code."""
    if e.get("type") != "alarm_raised":
        return ""
    d = e["data"]
    names = {str(d.get("key")), str(d.get("code"))}
    for a in rec.events:
        if a.get("type") == "operator_action" and int(a["seq"]) > int(e["seq"]):
            action = str(a["data"].get("action"))
            if any(n and n in action for n in names):
                return f"{a['data'].get('operator')} ({when(a.get('ts'))})"
    return "none recorded"


def build_doc(rec: DeliveryRecord, *, pubkey_name: str | None = None) -> ReportDoc:
    v, s, plan, dev = rec.verification, rec.summary, rec.plan, rec.device
    status = rec.status or "IN PROGRESS (no termination in the log)"
    doc = ReportDoc(
        title="IORT delivery record",
        subtitle=f"Delivery {rec.delivery_id}",
        status_line=f"Termination: {status}" + (f" ({rec.reason})" if rec.reason else ""),
        created=rec.last_ts,
        simulated=rec.simulated,
    )
    if not v.intact:
        doc.stamp = str(v.problem_brief)
    elif v.unvouched:
        doc.stamp_head = UNVOUCHED_HEAD
        doc.stamp = f"{v.unvouched} of this delivery (written after the last seal before a crash)"
    b = doc.blocks
    if rec.simulated:
        b.append(
            Para(
                "SIMULATED: the data of this delivery came from a simulator, not from "
                "treatment equipment.",
                "warn",
            )
        )

    b.append(Heading("Identification"))
    app = s.get("applicator") if isinstance(s.get("applicator"), dict) else {}
    speed = rec.clock_speed
    b.append(
        KeyValues(
            [
                ("Treatment ID (pseudonymous)", str(plan.get("treatment_id", "—"))),
                ("Plan ID (pseudonymous)", str(plan.get("plan_id", "—"))),
                ("Fraction", str(plan.get("fraction", "—"))),
                ("Delivery ID", rec.delivery_id),
                ("Site / room", f"{rec.site.get('id', '—')} / {rec.site.get('room', '—')}"),
                (
                    "Device (source console)",
                    f"{dev.get('manufacturer', '—')} {dev.get('model', '')}, "
                    f"s/n {dev.get('serial', '—')}, firmware {dev.get('firmware', '—')}"
                    + (" [SIMULATED]" if dev.get("simulated") else ""),
                ),
                (
                    "Applicator",
                    f"{app.get('type', '—')} {app.get('diameter_mm', '—')} mm, "
                    f"s/n {app.get('serial', '—')}; plan applicator {plan.get('applicator') or '—'}"
                    if app
                    else f"not reported; plan applicator {plan.get('applicator') or '—'}",
                ),
                ("Software (iortd)", str(rec.software_version or "—")),
                ("Configuration", str(rec.config_file or "—")),
                ("Configuration SHA-256", str(rec.config_sha256 or "—")),
                ("Delivery started", when(rec.started)),
                (
                    "Time base",
                    "device clock, real time"
                    if speed in (None, 1.0)
                    else f"simulated time, compressed x{speed:g} (device times are simulated)",
                ),
            ]
            + [
                (
                    f"Device re-identified (seq {d.get('seq')})",
                    f"{d.get('manufacturer')} {d.get('model')}, s/n {d.get('serial')}",
                )
                for d in rec.devices_seen
            ]
        )
    )

    b.append(Heading("Prescription and delivery"))
    intervals = rec.intervals()
    n_intr = sum(1 for i in intervals if i.kind == "interruption")
    n_gaps = sum(1 for i in intervals if i.kind == "gap")
    b.append(
        Table(
            ["", "specified", "delivered", "difference"],
            [
                [
                    "Dose, primary channel",
                    gy(rec.preset_gy),
                    gy(rec.delivered_primary_gy),
                    _pct(rec.delivered_primary_gy, rec.preset_gy),
                ],
                [
                    "Dose, secondary channel",
                    gy(rec.preset_gy),
                    gy(rec.delivered_secondary_gy),
                    _pct(rec.delivered_secondary_gy, rec.preset_gy),
                ],
                [
                    "Treatment (beam-on) time",
                    secs(s.get("planned_time_s")),
                    secs(s.get("beam_on_s", rec._last("beam_on_s"))),
                    _pct(s.get("beam_on_s"), s.get("planned_time_s")),
                ],
                [
                    "Backup-timer limit",
                    secs(s.get("backup_timer_limit_s")),
                    "",
                    "",
                ],
                ["Elapsed (first beam to end)", "", secs(s.get("elapsed_s")), ""],
                [
                    "Expected dose rate",
                    "—"
                    if _f(s.get("expected_rate_gy_min")) is None
                    else f"{_f(s.get('expected_rate_gy_min')):.3f} Gy/min",
                    "",
                    "",
                ],
            ],
            [0.34, 0.22, 0.22, 0.22],
        )
    )
    b.append(
        KeyValues(
            [
                ("Termination status (3008,002A)", rec.status or "— (delivery not terminated)"),
                ("Termination reason", str(rec.reason or "—")),
                ("Interruptions", str(n_intr) if n_intr else "none"),
                ("Monitoring gaps", str(n_gaps) if n_gaps else "none"),
                (
                    "Monitoring joined in progress",
                    "yes: dose before monitoring began is shown as unmonitored"
                    if rec.joined_in_progress
                    else "no",
                ),
            ]
            + (
                [("Continues record", f"{rec.continues}: {rec.continues_reason}")]
                if rec.continues
                else []
            )
            + [(f"Amendment {n}", str(a.get("reason"))) for n, a in enumerate(rec.amendments, 1)]
        )
    )

    b.append(Plot("Dose rate and accumulated dose against time"))
    b.append(
        Para(
            "Top: accumulated dose on both channels, the preset, and the expected dose "
            "(expected rate x the console's beam-on time, so it pauses while the beam is off). "
            "Bottom: dose rate reported by the console and the expected rate. Shaded: "
            "interruptions (amber) and monitoring gaps (red, hatched: no readings, so the "
            "lines are broken there).",
            "note",
        )
    )

    rows = segments_with_context(rec)
    if rows:
        b.append(Heading("Dose segments (interruption and resume tiling, DICOM PS3.3 C.8.8.21.2)"))
        b.append(
            Table(
                ["#", "kind", "from", "to", "dose", "beam-on", "ended by"],
                [
                    [
                        str(r.index + 1),
                        r.kind,
                        gy(r.start_gy, 4),
                        gy(r.end_gy, 4),
                        gy(r.end_gy - r.start_gy, 4),
                        f"{max(r.end_beam_on_s - r.start_beam_on_s, 0):.1f} s",
                        r.ended_by,
                    ]
                    for r in rows
                ],
                [0.04, 0.11, 0.13, 0.13, 0.13, 0.11, 0.35],
            )
        )
        total = sum(r.end_gy - r.start_gy for r in rows)
        b.append(
            Para(
                f"The segments tile the delivered dose with no gap and no overlap: their sum is "
                f"{total:.4f} Gy; the delivered primary dose is {gy(rec.delivered_primary_gy, 4)}.",
                "note",
            )
        )

    if intervals:
        b.append(Heading("Interruptions and monitoring gaps"))
        b.append(
            Table(
                ["kind", "from", "to", "cause"],
                [[i.kind, when(i.start), when(i.end), i.cause] for i in intervals],
                [0.14, 0.25, 0.25, 0.36],
            )
        )

    b.append(Heading("State transitions, interlock events and alarms"))
    # An entry without its own observation time (a termination, an amendment) happened
    # at the reading before it: shown with that reading's device time.
    device_time: dict[int, Any] = {}
    last_at: Any = rec.started
    for entry in rec.entries:
        last_at = entry["data"].get("at") or last_at
        device_time[int(entry["seq"])] = last_at
    b.append(
        Table(
            ["seq", "time", "event", "acknowledged by"],
            [
                [str(e["seq"]), when(device_time.get(int(e["seq"]))), describe(e), _ack(rec, e)]
                for e in rec.events
            ],
            [0.07, 0.25, 0.50, 0.18],
        )
    )
    if not any(e.get("type") == "operator_action" for e in rec.events):
        b.append(
            Para(
                "No operator acknowledgements are recorded for this delivery: the log holds "
                "no operator_action entry for it (iortd is a passive monitor without an "
                "operator command channel).",
                "note",
            )
        )

    b.append(Heading("Integrity"))
    cp = rec.checkpoint
    who = (
        f"--pubkey {pubkey_name}"
        if pubkey_name
        else "the key recorded in the log only (give --pubkey for assurance)"
    )
    b.append(
        KeyValues(
            [
                (
                    "Log verification",
                    f"NOT INTACT: {v.problem}"
                    if not v.intact
                    else f"chain INTACT, but entries {v.unvouched} of this delivery are "
                    "UNVOUCHED: not covered by any signature as genuine"
                    if v.unvouched
                    else f"INTACT: {v.entries} entries, {v.checkpoints} signed checkpoints "
                    "verified",
                ),
                ("Signatures checked against", who),
                ("Log origin", str(v.origin or "—")),
                ("Log files", ", ".join(v.files) or "—"),
                ("Log head", f"seq {v.head_seq}"),
                ("Log head hash", v.head_hash),
                ("This delivery's entries", f"seq {rec.first_seq} to {rec.last_seq}"),
                ("Last entry of the delivery", f"seq {rec.last_seq}, {when(rec.last_ts)}"),
                ("Last entry hash", str(rec.last_hash)),
                (
                    "Covering checkpoint",
                    f"seq {cp.seq}: covers entries 0..{cp.count - 1}, signed by "
                    f"{', '.join(cp.signers)} ({cp.reason or 'no reason'}, {cp.time or cp.ts})"
                    if cp
                    else "none yet: no signed checkpoint follows this delivery's last entry",
                ),
            ]
            + ([("Checkpoint head hash", cp.head_hash)] if cp else [])
        )
    )
    if cp:
        b.append(Para(cp.note.rstrip("\n"), "mono"))
    b.append(
        Para(
            "To re-verify: obtain the log directory and the daemon's public key, run "
            "'iort-audit verify LOGDIR --pubkey KEY.pub' (with --checkpoint for a copy kept "
            "off the host), and check that it reports the origin above, that entry "
            f"seq {rec.last_seq} has the hash above, and that the checkpoint at seq "
            f"{cp.seq if cp else '—'} verifies. The footer of every page carries the same "
            "figures.",
            "note",
        )
    )
    b.append(SignOff())

    doc.footer = (
        f"Log {v.origin or '?'} | delivery entries seq {rec.first_seq}-{rec.last_seq} | "
        f"checkpoint seq {cp.seq if cp else 'none'}",
        f"last entry hash {rec.last_hash}",
        f"log head seq {v.head_seq} hash {v.head_hash}"
        if v.intact
        else f"log NOT INTACT: verified only up to seq {v.head_seq}, hash {v.head_hash}",
        f"re-verify: iort-audit verify LOGDIR --pubkey KEY.pub | iort-audit {__version__}",
    )
    return doc


# ---- the plot -------------------------------------------------------------------------------


def _figure(rec: DeliveryRecord) -> Any:
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy import, only when plotting

    t0 = _parse(rec.started) or _parse(rec.samples[0]["data"].get("at") if rec.samples else None)

    def minutes(ts: Any) -> float | None:
        t = _parse(ts)
        return None if t is None or t0 is None else (t - t0).total_seconds() / 60.0

    xs: list[float] = []
    p: list[float | None] = []
    sec: list[float | None] = []
    rate: list[float | None] = []
    exp: list[float | None] = []
    s = rec.summary
    exp_rate = _f(s.get("expected_rate_gy_min"))
    preset = _f(rec.preset_gy)
    base: tuple[float, float] | None = None
    for e in rec.samples:
        d = e["data"]
        x = minutes(d.get("at"))
        if x is None:
            continue
        xs.append(x)
        p.append(_f(d.get("dose_primary_gy")))
        sec.append(_f(d.get("dose_secondary_gy")))
        rate.append(_f(d.get("dose_rate_gy_min")))
        beam = _f(d.get("beam_on_s"))
        if base is None and d.get("state") == "IRRADIATING" and beam is not None:
            base = (_f(d.get("dose_primary_gy")) or 0.0, beam)
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

    fig = Figure(figsize=(7.2, 4.4), layout="constrained")
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
    from matplotlib.patches import Patch  # noqa: PLC0415

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


# Typed as Any: matplotlib's stubs accept only literal rc keys.
_RC: Any = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "svg.hashsalt": "iortd-report",
    "svg.fonttype": "path",
    "path.simplify": False,
}


def plot_png(rec: DeliveryRecord) -> bytes:
    from matplotlib import rc_context  # noqa: PLC0415

    with rc_context(_RC):
        fig = _figure(rec)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return buf.getvalue()


def plot_svg(rec: DeliveryRecord) -> str:
    from matplotlib import rc_context  # noqa: PLC0415

    with rc_context(_RC):
        fig = _figure(rec)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


# ---- PDF ------------------------------------------------------------------------------------


def _font_dir() -> Path:
    import matplotlib  # noqa: PLC0415

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _register_fonts() -> None:
    from reportlab.lib.fonts import addMapping  # noqa: PLC0415
    from reportlab.pdfbase import pdfmetrics  # noqa: PLC0415
    from reportlab.pdfbase.ttfonts import TTFont  # noqa: PLC0415

    if "DejaVuSans" in pdfmetrics.getRegisteredFontNames():
        return
    d = _font_dir()
    for name, file in (
        ("DejaVuSans", "DejaVuSans.ttf"),
        ("DejaVuSans-Bold", "DejaVuSans-Bold.ttf"),
        ("DejaVuSansMono", "DejaVuSansMono.ttf"),
    ):
        pdfmetrics.registerFont(TTFont(name, str(d / file)))
    addMapping("DejaVuSans", 0, 0, "DejaVuSans")
    addMapping("DejaVuSans", 1, 0, "DejaVuSans-Bold")
    addMapping("DejaVuSans", 0, 1, "DejaVuSans")
    addMapping("DejaVuSans", 1, 1, "DejaVuSans-Bold")


def _pdf_date(ts: str | None) -> Callable[..., str]:
    """reportlab's date formatter, returning the log's time instead of now."""
    t = _parse(ts)
    text = "D:20000101000000Z" if t is None else t.strftime("D:%Y%m%d%H%M%SZ")

    def fmt(*_args: int) -> str:
        return text

    return fmt


def pdf_report(rec: DeliveryRecord, *, pubkey_name: str | None = None) -> bytes:
    from reportlab.lib import colors  # noqa: PLC0415
    from reportlab.lib.enums import TA_LEFT  # noqa: PLC0415
    from reportlab.lib.pagesizes import A4  # noqa: PLC0415
    from reportlab.lib.styles import ParagraphStyle  # noqa: PLC0415
    from reportlab.lib.units import mm  # noqa: PLC0415
    from reportlab.pdfgen.canvas import Canvas  # noqa: PLC0415
    from reportlab.platypus import (  # noqa: PLC0415
        Image,
        KeepTogether,
        Paragraph,
        SimpleDocTemplate,
        Spacer,
        TableStyle,
    )
    from reportlab.platypus import Table as RLTable  # noqa: PLC0415

    _register_fonts()
    doc = build_doc(rec, pubkey_name=pubkey_name)
    margin = 16 * mm
    width = A4[0] - 2 * margin
    base = ParagraphStyle(
        "body", fontName="DejaVuSans", fontSize=8.5, leading=11, alignment=TA_LEFT
    )
    styles = {
        "body": base,
        "note": ParagraphStyle(
            "note", parent=base, fontSize=7.5, leading=9.5, textColor=colors.HexColor("#444444")
        ),
        "mono": ParagraphStyle(
            "mono", parent=base, fontName="DejaVuSansMono", fontSize=6.8, leading=8.5
        ),
        "warn": ParagraphStyle(
            "warn", parent=base, fontName="DejaVuSans-Bold", textColor=colors.HexColor("#9c2a00")
        ),
        "cell": ParagraphStyle("cell", parent=base, fontSize=7.5, leading=9.3),
        "cellmono": ParagraphStyle(
            "cellmono", parent=base, fontName="DejaVuSansMono", fontSize=6.8, leading=9
        ),
        "head": ParagraphStyle(
            "head",
            parent=base,
            fontName="DejaVuSans-Bold",
            fontSize=11,
            leading=14,
            spaceBefore=8,
            spaceAfter=4,
            textColor=colors.HexColor("#1f4e79"),
        ),
        "title": ParagraphStyle(
            "title", parent=base, fontName="DejaVuSans-Bold", fontSize=16, leading=20
        ),
        "subtitle": ParagraphStyle("subtitle", parent=base, fontSize=10, leading=13),
        "status": ParagraphStyle(
            "status", parent=base, fontName="DejaVuSans-Bold", fontSize=10.5, leading=14
        ),
    }

    def p(text: str, style: str = "cell") -> Paragraph:
        return Paragraph(html.escape(text).replace("\n", "<br/>"), styles[style])

    grid = TableStyle(
        [
            ("FONT", (0, 0), (-1, -1), "DejaVuSans", 7.5),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.HexColor("#c8c8c8")),
            ("TOPPADDING", (0, 0), (-1, -1), 2),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ("LEFTPADDING", (0, 0), (-1, -1), 3),
            ("RIGHTPADDING", (0, 0), (-1, -1), 3),
        ]
    )
    header_style = TableStyle(
        [
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef5")),
            ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.HexColor("#1f4e79")),
        ]
    )
    story: list[Any] = [
        p(doc.title, "title"),
        p(doc.subtitle, "subtitle"),
        Spacer(1, 2 * mm),
        p(doc.status_line, "status"),
        Spacer(1, 2 * mm),
    ]
    for blk in doc.blocks:
        if isinstance(blk, Heading):
            story.append(p(blk.text, "head"))
        elif isinstance(blk, Para):
            story.append(p(blk.text, blk.style))
            story.append(Spacer(1, 1.5 * mm))
        elif isinstance(blk, KeyValues):
            t = RLTable(
                [[p(k), p(v, "cellmono" if _looks_hex(v) else "cell")] for k, v in blk.rows],
                colWidths=[0.30 * width, 0.70 * width],
            )
            t.setStyle(grid)
            story.append(t)
            story.append(Spacer(1, 2 * mm))
        elif isinstance(blk, Table):
            data = [[p(h) for h in blk.header]] + [
                [p(c, "cellmono" if i in blk.mono_cols else "cell") for i, c in enumerate(row)]
                for row in blk.rows
            ]
            t = RLTable(data, colWidths=[w * width for w in blk.widths], repeatRows=1)
            t.setStyle(grid)
            t.setStyle(header_style)
            story.append(t)
            story.append(Spacer(1, 2 * mm))
        elif isinstance(blk, Plot):
            png = plot_png(rec)
            img = Image(io.BytesIO(png), width=width, height=width * 4.4 / 7.2)
            story.append(KeepTogether([p(blk.caption, "head"), img]))
        elif isinstance(blk, SignOff):
            box = RLTable(
                [
                    [p("Reviewed by (medical physicist)"), p(""), p("Date"), p("")],
                    [p("Signature"), p(""), p("Comments"), p("")],
                ],
                colWidths=[0.22 * width, 0.36 * width, 0.12 * width, 0.30 * width],
                rowHeights=[12 * mm, 12 * mm],
            )
            box.setStyle(
                TableStyle(
                    [
                        ("GRID", (0, 0), (-1, -1), 0.5, colors.HexColor("#7f7f7f")),
                        ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ]
                )
            )
            story.append(KeepTogether([p("Review and sign-off", "head"), box]))

    footer = doc.footer
    stamp = doc.stamp

    class NumberedCanvas(Canvas):
        """Defers pages so that each footer can say 'page X of Y'."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []
            self.setDateFormatter(_pdf_date(doc.created))

        def showPage(self) -> None:
            self._pages.append(dict(self.__dict__))
            self._startPage()  # type: ignore[attr-defined]  # reportlab's page reset

        def save(self) -> None:
            total = len(self._pages)
            for n, state in enumerate(self._pages, start=1):
                self.__dict__.update(state)
                self._decorate(n, total)
                super().showPage()
            super().save()

        def _decorate(self, n: int, total: int) -> None:
            w, h = A4
            self.saveState()
            self.setStrokeColor(colors.HexColor("#1f4e79"))
            self.setLineWidth(0.5)
            self.line(margin, 20 * mm, w - margin, 20 * mm)
            self.setFont("DejaVuSansMono", 6.2)
            self.setFillColor(colors.HexColor("#333333"))
            y = 17 * mm
            for line in footer:
                self.drawString(margin, y, line)
                y -= 3 * mm
            self.setFont("DejaVuSans", 7)
            self.drawRightString(w - margin, 17 * mm, f"page {n} of {total}")
            self.setFont("DejaVuSans", 7)
            self.drawString(margin, h - 10 * mm, f"IORT delivery record  {rec.delivery_id}")
            if doc.simulated:
                self.setFillColor(colors.HexColor("#9c2a00"))
                self.drawRightString(w - margin, h - 10 * mm, "SIMULATED DATA")
            if stamp is not None:
                self.setFillColor(colors.HexColor("#c00000"))
                self.setFont("DejaVuSans-Bold", 8)
                self.drawString(margin, h - 14 * mm, doc.stamp_head)
                self.setFont("DejaVuSans", 7)
                self.drawString(margin, h - 17.5 * mm, stamp[:160])
                self.saveState()
                self.translate(w / 2, h / 2)
                self.rotate(45)
                self.setFillColor(colors.Color(0.85, 0.0, 0.0, alpha=0.18))
                self.setFont("DejaVuSans-Bold", 64)
                self.drawCentredString(0, 0, "NOT VERIFIED")
                self.restoreState()
            self.restoreState()

    buf = io.BytesIO()
    tmpl = SimpleDocTemplate(
        buf,
        pagesize=A4,
        leftMargin=margin,
        rightMargin=margin,
        topMargin=18 * mm if stamp is None else 24 * mm,
        bottomMargin=24 * mm,
        title=f"IORT delivery record {rec.delivery_id}",
        author="iort-audit",
        subject=f"audit log {rec.verification.origin}",
        creator=f"iort-audit {__version__}",
        invariant=1,
    )
    tmpl.build(story, canvasmaker=NumberedCanvas)
    return buf.getvalue()


def _looks_hex(text: str) -> bool:
    return len(text) >= 32 and all(c in "0123456789abcdef" for c in text)


# ---- HTML -----------------------------------------------------------------------------------

_CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;font-size:10pt;color:#111;
max-width:190mm;margin:12mm auto;padding-bottom:30mm}
h1{font-size:17pt;margin:0}h2{font-size:12pt;color:#1f4e79;margin:14pt 0 4pt}
.sub{font-size:11pt}.status{font-weight:bold;font-size:11pt;margin:6pt 0}
table{border-collapse:collapse;width:100%;margin:4pt 0 8pt}
td,th{text-align:left;vertical-align:top;padding:2pt 4pt;border-bottom:1px solid #ccc;
font-size:8.5pt}
th{background:#e8eef5;border-bottom:1.5px solid #1f4e79}
td.k{width:30%}.mono,pre{font-family:"DejaVu Sans Mono",monospace;font-size:8pt;
word-break:break-all}
.note{color:#444;font-size:8.5pt}.warn{color:#9c2a00;font-weight:bold}
.stamp{color:#fff;background:#c00000;padding:4pt 8pt;font-weight:bold}
.footer{font-family:"DejaVu Sans Mono",monospace;font-size:7.5pt;border-top:1px solid #1f4e79;
margin-top:16pt;padding-top:4pt;color:#333}
.signoff td{height:12mm;border:1px solid #7f7f7f}
figure{margin:0}svg{width:100%;height:auto}
@media print{.footer{position:fixed;bottom:0;left:0;right:0;background:#fff}}
"""


def html_report(rec: DeliveryRecord, *, pubkey_name: str | None = None) -> bytes:
    doc = build_doc(rec, pubkey_name=pubkey_name)
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(doc.title)} {e(rec.delivery_id)}</title>",
        f'<meta name="generator" content="iort-audit {__version__}">',
        f'<meta name="created" content="{e(doc.created or "")}">',
        f"<style>{_CSS}</style></head><body>",
    ]
    stamp = f"{doc.stamp_head} {doc.stamp}" if doc.stamp else None
    if stamp:
        out.append(f'<p class="stamp">{e(stamp)}</p>')
    out += [
        f"<h1>{e(doc.title)}</h1>",
        f'<p class="sub">{e(doc.subtitle)}</p>',
        f'<p class="status">{e(doc.status_line)}</p>',
    ]
    for blk in doc.blocks:
        if isinstance(blk, Heading):
            out.append(f"<h2>{e(blk.text)}</h2>")
        elif isinstance(blk, Para):
            if blk.style == "mono":
                out.append(f"<pre>{e(blk.text)}</pre>")
            else:
                out.append(f'<p class="{blk.style}">{e(blk.text)}</p>')
        elif isinstance(blk, KeyValues):
            out.append("<table>")
            for k, v in blk.rows:
                cls = ' class="mono"' if _looks_hex(v) else ""
                out.append(f'<tr><td class="k">{e(k)}</td><td{cls}>{e(v)}</td></tr>')
            out.append("</table>")
        elif isinstance(blk, Table):
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in blk.header) + "</tr>")
            for row in blk.rows:
                out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif isinstance(blk, Plot):
            out.append(f"<h2>{e(blk.caption)}</h2><figure>{plot_svg(rec)}</figure>")
        elif isinstance(blk, SignOff):
            out.append(
                '<h2>Review and sign-off</h2><table class="signoff">'
                "<tr><td>Reviewed by (medical physicist)</td><td></td><td>Date</td><td></td></tr>"
                "<tr><td>Signature</td><td></td><td>Comments</td><td></td></tr></table>"
            )
    out.append('<div class="footer">' + "<br>".join(e(x) for x in doc.footer) + "</div>")
    if stamp:
        out.append(f'<p class="stamp">{e(stamp)}</p>')
    out.append("</body></html>\n")
    return "\n".join(out).encode("utf-8")
