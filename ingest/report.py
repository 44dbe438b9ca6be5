"""``iort-ingest report``: per room, from the store alone (read-only; the service may be
running): received, repaired, skipped, still missing, repeats, invalid, requests, time to
repair. "Missing" is every hole between the first and the last seq accounted for of each
stream (received or declared by the room), the same bookkeeping as the service's
(ingest/lines.py), rebuilt from the rows."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from iortd.ingest.lines import SeqLine
from iortd.ingest.store import Store, unq

__all__ = ["room_report"]


def room_report(db_path: Path) -> list[dict[str, Any]]:
    db = Store.read_only(db_path)
    try:
        lines: dict[tuple[str, str, str], SeqLine] = {}
        rooms: dict[tuple[str, str], dict[str, Any]] = {}

        def room(site: str, name: str) -> dict[str, Any]:
            return rooms.setdefault(
                (site, name),
                {"site": site, "room": name, "received": 0, "repaired": 0, "skipped": 0,
                 "missing": 0, "repeats": 0, "invalid": 0, "requests": 0,
                 "repair_p50_s": None, "repair_max_s": None},
            )  # fmt: skip

        for site, name, topic, session, seq, repaired in db.execute(
            "SELECT site, room, topic, session, seq, repaired FROM messages ORDER BY seq"
        ):
            line = lines.setdefault((site, name, topic), SeqLine(topic))
            r = room(site, name)
            if line.received(unq(seq), session):
                r["received"] += 1
                r["repaired"] += repaired
        for site, name, topic, first, last in db.execute(
            "SELECT site, room, topic, first, last FROM skips"
        ):
            line = lines.setdefault((site, name, topic), SeqLine(topic))
            room(site, name)["skipped"] += line.add(unq(first), unq(last))
        for (site, name, _), line in lines.items():
            room(site, name)["missing"] += line.missing()
        for site, name, what, value in db.execute("SELECT site, room, name, value FROM counters"):
            if what in ("repeats", "invalid", "requests"):
                room(site, name)[what] = value
        took: dict[tuple[str, str], list[float]] = {}
        for site, name, noticed, closed in db.execute(
            "SELECT site, room, noticed_at, closed_at FROM repairs"
        ):
            took.setdefault((site, name), []).append(closed - noticed)
        for key, values in took.items():
            r = room(*key)
            r["repair_p50_s"] = round(statistics.median(values), 3)
            r["repair_max_s"] = round(max(values), 3)
        return [rooms[k] for k in sorted(rooms)]
    finally:
        db.close()
