"""Reading back what the outbox still holds, for a replay request (issue 22).

The outbox (daemon/mqtt/outbox.py) keeps acknowledged journal segments for
``[mqtt] replay_retention_s`` instead of deleting them at once; :func:`read_held` finds
one stream's messages of one session in a range of ``seq`` in those files. It runs in a
worker thread, without the outbox's I/O lock (a replay must not hold up the journal): the
caller passes each segment's size as it was when the request came, and only that prefix
is read (a batch being appended is not half read); a segment deleted or compacted away
meanwhile is simply not held any more. A line that does not parse is skipped (recovery
at the next start sets the segment aside, outbox.py): what it held is declared not held.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from iortd.daemon.mqtt.payloads import TOPICS

__all__ = ["HeldLine", "held", "read_held", "retired"]

# (n, seq, the journal line, where the payload starts in it)
HeldLine = tuple[int, int, bytes, int]


def retired(segments: Sequence[Any], acked: int, retention_s: float, max_bytes: int) -> int:
    """How many of the outbox's segments (oldest first), from the front, go now: those
    holding nothing unacknowledged once held ``retention_s`` (from when this run first
    saw them so; a restart holds them anew), or while the held ones exceed ``max_bytes``.
    Stamps each segment's ``acked_at`` (monotonic)."""
    now = time.monotonic()
    for seg in segments:
        if seg.last_n > acked:
            seg.acked_at = None
        elif seg.acked_at is None:
            seg.acked_at = now
    held = sum(s.size for s in segments if s.acked_at is not None)
    n = 0
    for seg in segments:
        if seg.acked_at is None or (now - seg.acked_at < retention_s and held <= max_bytes):
            break
        held -= seg.size
        n += 1
    return n


def read_held(
    segments: Iterable[tuple[Path, int]], topic: str, session: int, first: int, last: int
) -> list[HeldLine]:
    """Every journal line of ``topic`` in ``session`` with ``first <= seq <= last``, from
    the first ``size`` bytes of each segment, in the order found."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}")
    marker = orjson.dumps({"t": topic})[1:-1]  # "t":"telemetry"
    out: list[HeldLine] = []
    for path, size in segments:
        try:
            with path.open("rb") as f:
                data = f.read(size)
        except FileNotFoundError:
            continue  # retired or compacted meanwhile: not held
        for raw in data.splitlines(keepends=True):
            if marker not in raw or not raw.endswith(b"\n"):
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                obj = orjson.loads(raw)
                p = obj["p"]
                seq, sess = p["seq"], p["session"]
                if obj["t"] == topic and sess == session and first <= seq <= last:
                    at = raw.find(b',"p":') + 5
                    out.append((int(obj["n"]), int(seq), raw, at))
    return out


async def held(
    segments: Sequence[Any],
    pending: Iterable[Any],
    record: Callable[..., Any],
    want: tuple[str, int, int, int],
) -> list[Any]:
    """:meth:`Outbox.held <iortd.daemon.mqtt.outbox.Outbox.held>`: the held lines of
    ``want`` (topic, session, first, last) made ``record``s (acknowledged: done), with the
    outbox's ``pending`` records of that range (on disk or not yet: they go out anyway),
    by ``seq``, each once."""
    topic, session, first, last = want
    segs = [(s.path, s.size) for s in segments]
    found = await asyncio.to_thread(read_held, segs, topic, session, first, last)
    out = {q: record(n, topic, False, q, session, b, i, -1, True, True) for n, q, b, i in found}
    for r in pending:
        if r.topic == topic and r.session == session and first <= r.seq <= last:
            out[r.seq] = r
    return [out[q] for q in sorted(out)]
