"""The sign-off judgement's backwards scan (daemon/signoff.py ``_scan``) finds the same
range as ``iort-audit verify``'s one pass over the whole log (auditlog/signoff.py), also
when the delivery crossed a segment boundary and the next delivery started after it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.signoff import delivery_record
from iortd.daemon.signoff import _scan

D1, D2 = "or-3-20261206T080000000000Z", "or-3-20261206T090000000000Z"


def entry(seq: int, kind: str, did: str | None = None, data: Any = None) -> dict[str, Any]:
    e: dict[str, Any] = {"data": data or {}, "seq": seq, "type": kind}
    if did is not None:
        e["delivery_id"] = did
    e["hash"] = hashlib.sha256(str(seq).encode()).hexdigest()
    return e


def write(directory: Path, segments: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each list as one segment named after its first seq; all entries, in seq order."""
    for path in directory.iterdir():
        path.unlink()
    for seg in segments:
        lines = [orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in seg]
        name = f"log-{seg[0]['seq']:016d}-20261206.jsonl"
        (directory / name).write_bytes(b"\n".join(lines) + b"\n")
    return [e for seg in segments for e in seg]


def test_a_delivery_across_a_segment_boundary_is_found_whole(tmp_path: Path) -> None:
    older = [entry(0, "daemon_starting"), entry(1, "delivery_started", D1), entry(2, "device", D1)]
    newer = [
        entry(3, "device", D1),
        entry(4, "delivery_terminated", D1),
        entry(5, "checkpoint", data={"note": "n", "count": 6, "head": "aa"}),
    ]
    # Before the next delivery starts, and after: the same range, the whole log's.
    for tail in ([], [entry(6, "delivery_started", D2), entry(7, "device", D2)]):
        everything = write(tmp_path, [older, newer + tail])
        found = _scan(tmp_path, D1, "phys-anna").found
        assert found == delivery_record(everything, D1)
        assert found is not None
        assert (found.first_seq, found.last_seq) == (1, 4)


def test_bytes_like_its_start_inside_another_entry_do_not_end_the_scan(tmp_path: Path) -> None:
    """Only the delivery's own ``delivery_started`` entry (its top-level type and id) ends
    the scan: an entry whose data holds the same keys and values is not its start."""
    lookalike = {"delivery_id": D1, "hash": "0" * 64, "type": "delivery_started"}
    older = [entry(0, "daemon_starting"), entry(1, "delivery_started", D1), entry(2, "device", D1)]
    newer = [
        entry(3, "delivery_terminated", D1),
        entry(4, "note", data={"x": lookalike}),
        entry(5, "checkpoint", data={"note": "n", "count": 5, "head": "aa"}),
    ]
    everything = write(tmp_path, [older, newer])
    found = _scan(tmp_path, D1, "phys-anna").found
    assert found == delivery_record(everything, D1)
    assert found is not None
    assert found.first_seq == 1
