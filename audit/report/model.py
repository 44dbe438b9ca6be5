"""The report's document model, and how it writes figures, times and durations.

A report is a title, a status line and a list of blocks; ``content.py`` fills them from the
record and each renderer (``pdf.py``, ``html_page.py``) lays out every kind of block, so
the PDF and the HTML say the same things in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "Block",
    "Heading",
    "KeyValues",
    "Para",
    "Plot",
    "ReportDoc",
    "SignOff",
    "Table",
    "gy",
    "looks_hex",
    "number",
    "parse_ts",
    "pct",
    "secs",
    "when",
]


# ---- formatting ---------------------------------------------------------------------------


def number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def gy(x: Any, digits: int = 3) -> str:
    v = number(x)
    return "—" if v is None else f"{v:.{digits}f} Gy"


def secs(x: Any) -> str:
    """Seconds as m:ss (h:mm:ss) and the exact seconds."""
    v = number(x)
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


def parse_ts(ts: Any) -> datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts)
    except ValueError:
        return None


def pct(a: Any, b: Any) -> str:
    x, y = number(a), number(b)
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
    style: str = "body"  # body, note, mono, warn, outcome (large: the verification outcome)


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
    kind: str = "dose"  # "dose" or "displacement" (the applicator reader's, plot.py)


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


def looks_hex(text: str) -> bool:
    """A hash or key: set in the monospaced face."""
    return len(text) >= 32 and all(c in "0123456789abcdef" for c in text)
