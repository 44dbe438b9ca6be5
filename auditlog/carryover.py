"""What the previous run left open, read from the log at start-up.

A crash (or a stop) during a delivery leaves it open in the log: the next run takes it
over (the same delivery id, its last sample as the starting point) rather than inventing a
new one. Only vouched entries count (vouch.py): a forged ``delivery_terminated`` in an
unvouched tail must not close a delivery, nor a forged sample stand as its last; deliveries
that were *started* in the unvouched tail cannot be taken over at all (nothing vouched
names them), and the start closes them.

The log core knows the few entry types this needs (``delivery_started``,
``delivery_terminated``, ``sample``, ``monitoring_gap_started``, ``daemon_start``) by name
only; what they mean is the daemon's. Both scans run backwards from the
newest entry and stop as early as the log allows, so a start reads the open delivery's own
runs, not the whole log.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.logdir import entry_seq, read_segment

__all__ = ["open_delivery", "started_unvouched"]

OpenDelivery = tuple[str | None, Mapping[str, Any] | None, Mapping[str, Any] | None, str | None]
_NO_OPEN: OpenDelivery = (None, None, None, None)


def open_delivery(segments: list[Path], vouched_count: int | None = None) -> OpenDelivery:
    """The delivery left open by the previous run, if any, with its last sample and its
    delivery_started data, from vouched entries only (seq < ``vouched_count``, when
    given): a forged delivery_terminated in an unvouched tail must not close the delivery,
    nor a forged sample stand as its last. The fourth item is the start of the oldest
    monitoring gap of that delivery recorded after its last sample (a run that took it over
    and never heard the console): nobody has watched it since then.

    Scans backwards to the newest delivery_started or delivery_terminated entry. A
    daemon_start either closed what was open before it (it then names no open delivery:
    nothing older can still be open, so the scan stops there) or took it over (it names
    it in ``open_delivery``: the scan goes on to that delivery's start, through runs that
    each carried it). This bounds the work at start-up to the open delivery's own runs.
    """
    last_sample: dict[str, Mapping[str, Any]] = {}
    gap_since: dict[str, str] = {}
    carried: str | None = None
    for path in reversed(segments):
        for raw in reversed(read_segment(path).splitlines()):
            if vouched_count is not None:
                seq = entry_seq(raw)
                if seq is None or seq >= vouched_count:
                    continue
            # "type" sorts last, so the kind is the end of the line: no parse needed.
            if raw.endswith(b'"type":"daemon_start"}'):
                try:
                    data = orjson.loads(raw).get("data")
                except orjson.JSONDecodeError:
                    data = None
                opened = data.get("open_delivery") if isinstance(data, dict) else None
                if not isinstance(opened, str) or carried not in (None, opened):
                    return _NO_OPEN
                carried = opened
                continue
            if b'"delivery_id":' not in raw:
                continue
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            kind, did = entry.get("type"), entry.get("delivery_id")
            if not isinstance(did, str):
                continue
            if kind == "sample" and did not in last_sample:
                last_sample[did] = entry.get("data", {})
            elif kind == "monitoring_gap_started" and did not in last_sample:
                start = (entry.get("data") or {}).get("start")
                if isinstance(start, str):
                    gap_since[did] = start  # older ones overwrite: the oldest is kept
            elif kind == "delivery_terminated":
                return _NO_OPEN
            elif kind == "delivery_started":
                if carried not in (None, did):
                    return _NO_OPEN
                return did, last_sample.get(did), entry.get("data", {}), gap_since.get(did)
    return _NO_OPEN


def started_unvouched(segments: list[Path], vouched_count: int) -> list[str]:
    """Deliveries whose delivery_started is at or after ``vouched_count`` and that no
    delivery_terminated after it ends, oldest first (a scan of the unvouched tail only)."""
    started: list[str] = []
    ended: set[str] = set()
    for path in reversed(segments):
        for raw in reversed(read_segment(path).splitlines()):
            seq = entry_seq(raw)
            if seq is None:
                continue
            if seq < vouched_count:
                return started[::-1]
            is_end = raw.endswith(b'"type":"delivery_terminated"}')
            if not (is_end or raw.endswith(b'"type":"delivery_started"}')):
                continue
            try:
                did = orjson.loads(raw).get("delivery_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if not isinstance(did, str):
                continue
            if is_end:
                ended.add(did)
            elif did not in ended and did not in started:
                started.append(did)
        if int(path.name[4:20]) <= vouched_count:
            break
    return started[::-1]
