"""A room's alarm list, from the retained ``alarms`` topic (issue 19, item 3): pure, no I/O.

The daemon publishes, retained, every **standing** alarm (acknowledged or not) and every
**cleared** one **not yet acknowledged**, oldest first, on every change (at most every
0.25 s), at its start (rebuilt from the audit log) and at every reconnect
(docs/mqtt-topics.md, ``alarms``). That message is the room's alarm list on the page: a
dashboard (re)started gets it from the broker at once, so the open and acknowledged alarms
show without waiting for an event.

Why only the retained topic, not also the ``events`` stream between two of its messages:
the daemon republishes the list within 0.25 s of any change, far inside the page's own
refresh and the 5 s staleness bound, and a list merged from two sources can show a state
the daemon never had (an ``alarm_raised`` drawn as unacknowledged after a later ``alarms``
already had it acknowledged, or the other way round, depending on which arrived last). One
source, one truth; the events go on feeding the page's event log as before.

**Rows** (:func:`alarm_rows`) are in the order someone in the room needs them:

1. standing and not acknowledged, then standing and acknowledged, then cleared and not
   acknowledged (latched: it ended before anyone took it), then anything else;
2. within each, the highest severity first (IEC 60601-1-8 priorities: high, medium, low);
3. then the newest raising first, then the key (a total order: the page never reshuffles).

So a standing, unacknowledged HIGH alarm is always at the top. Each row has an ``id``
(:func:`row_id`): the JSON array ``[key, raised_at, delivery_id]``, the three values an
``ack`` command's body names (docs/commands.md), unambiguous whatever characters a key
holds and unchanged when the same raising comes back acknowledged or cleared, so that a
button added to a row later acknowledges that raising and no other.

**Checks** beyond the schema (:func:`alarm_error`), for what no daemon sends:

* ``alarms duplicate``: two items of one raising (the same key and ``raised_at``). The
  daemon's ledger holds one raising per pair (daemon/alarm_ledger.py); two rows with one
  id would make a button ambiguous.
* ``alarms names``: an acknowledger's printed name, or a key, that is not printable text
  (``str.isprintable``: no control, format or bidi characters). The keyring enrols only
  printable names (auditlog/keyring.py) and the ``ack`` command takes only printable keys;
  a right-to-left override or a zero-width space would let "acknowledged by" read as
  someone else.

The **counts** (:func:`alarm_view` with ``summary``) are what the overview's card shows:
``unacknowledged`` includes the ``omitted`` ones (cleared, unacknowledged, beyond the
daemon's cap of 256).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

from iortd.dashboard.schemas import published, schema_error

__all__ = [
    "SEVERITY_RANK",
    "CheckedItems",
    "alarm_error",
    "alarm_rows",
    "alarm_view",
    "row_id",
]

Payload = dict[str, Any]

SEVERITY_RANK = {"high": 3, "medium": 2, "low": 1}
_ENVELOPE = ("schema", "session", "seq", "ts", "sim", "historical", "omitted")


CHECKED_BYTES = 2 * 1024 * 1024  # items remembered as valid, all rooms together


class CheckedItems:
    """The schema check of ``alarms`` payloads, remembering the items found valid.

    Checking a list of 256 items against the published schema costs some 40-60 ms
    (jsonschema, about 0.2 ms an item; measured on the 2-core VM under load), and the
    daemon republishes the whole list on every change, at most 4 times a second. Nearly
    all of its items are the same as in the last message, so an item already found valid
    (the same bytes) is not checked again: the payload is checked with only its new items
    in the list, and its length against ``maxItems`` apart. That is the published schema's
    verdict exactly, because the list's schema is ``type``, ``items`` and ``maxItems``
    only (each item valid on its own; checked when this is built: otherwise every payload
    is checked whole). Remembered: at most ``max_bytes`` of items' bytes, least recently
    seen forgotten first; bounded, and the same for every room (a publisher can only make
    it forget, which costs time, never a wrong verdict)."""

    def __init__(self, max_bytes: int = CHECKED_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        spec = published("alarms")["properties"]["alarms"]
        self._max_items: int | None = (
            spec.get("maxItems") if set(spec) <= {"type", "items", "maxItems"} else None
        )

    def schema_error(self, payload: Payload) -> str | None:
        """As :func:`iortd.dashboard.schemas.schema_error` for ``alarms``."""
        items = payload.get("alarms")
        if (
            self._max_items is None
            or not isinstance(items, list)
            or len(items) > self._max_items
            or not all(isinstance(a, dict) for a in items)
        ):
            return schema_error("alarms", payload)
        try:
            keys = [orjson.dumps(a) for a in items]
        except orjson.JSONEncodeError:  # not from JSON (an in-process caller): check whole
            return schema_error("alarms", payload)
        new = [a for a, k in zip(items, keys, strict=True) if k not in self._seen]
        reason = schema_error("alarms", {**payload, "alarms": new})
        if reason is None:
            for k in keys:
                self._remember(k)
        return reason

    def _remember(self, key: bytes) -> None:
        if key in self._seen:
            self._seen.move_to_end(key)
            return
        self._seen[key] = None
        self.bytes += len(key)
        while self.bytes > self.max_bytes and self._seen:
            old, _ = self._seen.popitem(last=False)
            self.bytes -= len(old)


def row_id(item: Payload) -> str:
    """The stable id of one raising: ``[key, raised_at, delivery_id]`` as JSON."""
    return orjson.dumps([item["key"], item["raised_at"], item["delivery_id"]]).decode()


def alarm_error(payload: Payload) -> tuple[str, str] | None:
    """Why a schema-valid ``alarms`` payload is not one a daemon sends, as (reason,
    detail); None if it is (see the module's doc)."""
    seen: set[tuple[str, str]] = set()
    for a in payload["alarms"]:
        pair = (a["key"], a["raised_at"])
        if pair in seen:
            return (
                "alarms duplicate",
                "alarms duplicate: two items of one raising (the same key and raised_at)",
            )
        seen.add(pair)
        if not a["key"].isprintable():
            return "alarms names", "alarms names: a key that is not printable text"
        ack = a["acknowledged"]
        if ack is not None and not ack["name"].isprintable():
            return "alarms names", "alarms names: an acknowledger's name that is not printable text"
    return None


def _rank(row: Payload) -> tuple[int, int]:
    standing, acked = row["cleared_at"] is None, row["acknowledged"] is not None
    group = 0 if standing and not acked else 1 if standing else 2 if not acked else 3
    return group, -SEVERITY_RANK.get(row["severity"], 0)


def alarm_rows(payload: Payload) -> list[Payload]:
    """The list's rows, in the page's order, each with its ``id`` and ``standing``."""
    rows = [
        {
            "id": row_id(a),
            "standing": a["cleared_at"] is None,
            **{k: a[k] for k in ("key", "code", "severity", "message", "raised_at")},
            "cleared_at": a["cleared_at"],
            "delivery_id": a["delivery_id"],
            "acknowledged": None if a["acknowledged"] is None else dict(a["acknowledged"]),
        }
        for a in payload["alarms"]
    ]
    # Stable sorts, the last the most significant: key, newest raising, group and severity
    # (RFC 3339 with microseconds and Z is fixed-width: its text sorts as its time).
    rows.sort(key=lambda r: r["key"])
    rows.sort(key=lambda r: r["raised_at"], reverse=True)
    rows.sort(key=_rank)
    return rows


def alarm_view(payload: Payload, *, summary: bool) -> Payload:
    """What a page gets of one ``alarms`` message: the envelope, the counts and (unless
    ``summary``, for the overview) the rows."""
    items = payload["alarms"]
    unacked = [a for a in items if a["acknowledged"] is None]
    out: Payload = {
        "envelope": {k: payload[k] for k in _ENVELOPE},
        "listed": len(items),
        "omitted": payload["omitted"],
        "standing": sum(a["cleared_at"] is None for a in items),
        "unacknowledged": len(unacked) + payload["omitted"],
        "standing_unacknowledged_high": sum(
            a["cleared_at"] is None and a["severity"] == "high" for a in unacked
        ),
    }
    if not summary:
        out["rows"] = alarm_rows(payload)
    return out
