"""A delivery's dose segments, each with what its samples say at its two ends.

The tracker tiles the delivered dose into segments (beam, beam off, unmonitored, before a
restart, in a previous record) with no gap and no double count, and writes them into the
delivery's summary. :func:`segments_with_context` adds, at each boundary, the secondary
channel, the beam-on time, the time and the dose rate from the sample whose primary count
is that boundary, and says what ended each segment. Both the report's segment table
(report/content.py) and the DICOM record's Treatment Session Beam Sequence (dicom.py) are
built from these rows, so they agree. Pure: no library beyond the standard one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from iortd.audit.record import DeliveryRecord

__all__ = ["SegmentRow", "row_kind", "segments_with_context"]


@dataclass(frozen=True, slots=True)
class SegmentRow:
    """One dose segment with what the samples say at its two ends."""

    index: int
    kind: str
    start_gy: float
    end_gy: float
    start_secondary_gy: float
    end_secondary_gy: float
    start_beam_on_s: float
    end_beam_on_s: float
    start_at: str | None
    end_at: str | None
    start_rate: float | None
    end_rate: float | None
    ended_by: str  # "interruption: <cause>", "termination", ...


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def row_kind(s: Mapping[str, Any]) -> str:
    return str(s.get("kind"))


def segments_with_context(rec: DeliveryRecord) -> list[SegmentRow]:
    """The summary's dose segments, each with the secondary channel, beam-on time, time
    and dose rate taken from the sample whose primary count is the segment's boundary
    (the tracker builds boundaries from readings, so that sample exists); the last
    boundary takes the delivery's final figures."""
    segs = [s for s in rec.summary.get("segments") or [] if isinstance(s, Mapping)]
    if not segs:
        return []
    samples = [e["data"] for e in rec.samples]
    final_sec = _num(rec.delivered_secondary_gy)
    final_beam = _num(rec.summary.get("beam_on_s"))

    def at_dose(gy: float, *, first: bool) -> Mapping[str, Any] | None:
        hits: list[Mapping[str, Any]] = [s for s in samples if _num(s.get("dose_primary_gy")) == gy]
        if not hits:
            return None
        return hits[0] if first else hits[-1]

    intr = [i for i in rec.intervals() if i.kind == "interruption"]
    rows: list[SegmentRow] = []
    for n, s in enumerate(segs):
        start, end = float(s["start_gy"]), float(s["end_gy"])
        a = at_dose(start, first=False) if n else at_dose(start, first=True)
        b = at_dose(end, first=True)
        last = n == len(segs) - 1
        sec_a = 0.0 if n == 0 and start == 0 else _num((a or {}).get("dose_secondary_gy"))
        sec_b = final_sec if last else _num((b or {}).get("dose_secondary_gy"))
        beam_a = 0.0 if n == 0 and start == 0 else _num((a or {}).get("beam_on_s"))
        beam_b = final_beam if last else _num((b or {}).get("beam_on_s"))
        if last:
            ended = f"termination {rec.status or 'UNKNOWN'}: {rec.reason}"
        else:
            cause = next(
                (i.cause for i in intr if b is not None and i.start >= str(b.get("at"))), None
            )
            following = str(segs[n + 1].get("kind"))
            if cause:
                ended = f"interruption: {cause}"
            elif row_kind(s) == "unmonitored":
                ended = "monitoring began"
            elif following == "beam_off":
                ended = "dose counted with the beam reported off"
            else:
                ended = "segment end"
        rows.append(
            SegmentRow(
                index=n,
                kind=str(s.get("kind")),
                start_gy=start,
                end_gy=end,
                start_secondary_gy=sec_a if sec_a is not None else start,
                end_secondary_gy=sec_b if sec_b is not None else end,
                start_beam_on_s=beam_a or 0.0,
                end_beam_on_s=beam_b or 0.0,
                start_at=(a or {}).get("at"),
                end_at=(b or {}).get("at"),
                start_rate=_num((a or {}).get("dose_rate_gy_min")),
                end_rate=_num((b or {}).get("dose_rate_gy_min")),
                ended_by=ended,
            )
        )
    # Contiguous by construction: each start takes the previous end (secondary, beam-on),
    # so that the items tile on every channel.
    for n in range(1, len(rows)):
        prev = rows[n - 1]
        rows[n] = SegmentRow(
            **{
                **{f: getattr(rows[n], f) for f in SegmentRow.__slots__},
                "start_secondary_gy": prev.end_secondary_gy,
                "start_beam_on_s": prev.end_beam_on_s,
            }
        )
    return rows
