"""The report as a PDF, laid out with reportlab.

Paragraphs, tables that break across pages with repeated headers, the plot as a PNG at
print resolution, and on every page a footer with the log's origin, the delivery's
entries, its last hash and the covering checkpoint ("page X of Y": pages are deferred until
the count is known), plus the NOT VERIFIED stamp and watermark when the log is not
verified. Deterministic: reportlab's invariant mode (fixed document id), the creation date
taken from the delivery's last entry, the DejaVu fonts embedded from matplotlib's data
(pinned with it), never a system font.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
from reportlab.lib import colors
from reportlab.lib.enums import TA_LEFT
from reportlab.lib.fonts import addMapping
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    TableStyle,
)
from reportlab.platypus import Table as RLTable

from iortd.audit.record import DeliveryRecord
from iortd.audit.report.content import build_doc
from iortd.audit.report.model import (
    Heading,
    KeyValues,
    Para,
    Plot,
    SignOff,
    Table,
    looks_hex,
    parse_ts,
)
from iortd.audit.report.plot import PLOT_SIZES, plot_png
from iortd.auditlog.keyring import Keyring
from iortd.kernel.version import __version__

__all__ = ["pdf_report"]


def _font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _register_fonts() -> None:

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
    t = parse_ts(ts)
    text = "D:20000101000000Z" if t is None else t.strftime("D:%Y%m%d%H%M%SZ")

    def fmt(*_args: int) -> str:
        return text

    return fmt


def pdf_report(
    rec: DeliveryRecord,
    *,
    pubkey_name: str | None = None,
    keyring: Keyring | None = None,
) -> bytes:
    _register_fonts()
    doc = build_doc(rec, pubkey_name=pubkey_name, keyring=keyring)
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
        "outcome": ParagraphStyle(
            "outcome", parent=base, fontName="DejaVuSans-Bold", fontSize=18, leading=23
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
                [[p(k), p(v, "cellmono" if looks_hex(v) else "cell")] for k, v in blk.rows],
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
            png = plot_png(rec, blk.kind)
            w_in, h_in = PLOT_SIZES[blk.kind]
            img = Image(io.BytesIO(png), width=width, height=width * h_in / w_in)
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
