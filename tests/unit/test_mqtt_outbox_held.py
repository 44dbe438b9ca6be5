"""What the outbox still holds for a replay (issue 22): acknowledged segments kept for
``retention_s`` (and within the byte bound) instead of deleted at once, across restarts
and compaction, and :meth:`Outbox.held` reading a topic's range of one session back."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_mqtt_outbox import Harness, add, journaled, segments

from iortd.daemon.mqtt.outbox import Outbox, Record

MAX_BYTES = 1024 * 1024


async def _open(h: Harness, retention_s: float, max_bytes: int = MAX_BYTES) -> Outbox:
    ob = await Outbox.open(h.directory, max_bytes, retention_s=retention_s)
    h.tasks[ob] = asyncio.create_task(ob.run(), name="outbox-run")
    return ob


async def _filled(ob: Outbox, n: int = 3000) -> list[Record]:
    recs: list[Record] = []
    for i in range(n):
        recs.append(add(ob, "events" if i % 7 == 0 else "telemetry", i))
        if i % 100 == 99:
            await journaled(ob, recs[-1])
    await journaled(ob, recs[-1])
    return recs


def _seqs(recs: list[Record]) -> list[int]:
    return [r.seq for r in recs]


async def test_acknowledged_segments_are_held_for_the_retention_and_read_back(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path / "mqtt-outbox")
    ob = await _open(h, retention_s=3600.0)
    recs = await _filled(ob)
    segs = segments(h.directory)
    assert len(segs) >= 3, "the test needs several segments"
    for rec in recs:
        ob.ack(rec)
    await h.close(ob)
    assert segments(h.directory) == segs, "acknowledged segments were deleted within retention"

    tele = [r for r in recs if r.topic == "telemetry"]
    ob2 = await _open(h, retention_s=3600.0)
    assert not ob2.pending  # held is not pending: nothing is sent again by itself
    got = await ob2.held("telemetry", 1, tele[10].seq, tele[500].seq)
    assert _seqs(got) == _seqs(tele[10:501])
    assert all(r.session == 1 and r.topic == "telemetry" for r in got)
    assert got[0].body == tele[10].body  # the bytes as published live
    assert await ob2.held("telemetry", 2, 0, 10**6) == []  # another session's
    assert _seqs(await ob2.held("events", 1, 0, 3)) == [0, 1, 2, 3]
    await h.close(ob2)


async def test_held_segments_go_after_the_retention_or_beyond_the_byte_bound(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path / "mqtt-outbox")
    ob = await _open(h, retention_s=0.0)  # the old behaviour: deleted once acknowledged
    for rec in await _filled(ob):
        ob.ack(rec)
    await h.close(ob)
    assert segments(h.directory) == []

    # Held bytes beyond the bound: the oldest go first, the newest stay.
    ob = await _open(h, retention_s=3600.0, max_bytes=MAX_BYTES)
    recs = await _filled(ob, 12_000)  # ~1.4 MB of journal: more than the bound
    for rec in recs:
        ob.ack(rec)
    await h.close(ob)
    kept = sum(p.stat().st_size for p in segments(h.directory))
    assert 0 < kept <= MAX_BYTES
    ob = await _open(h, retention_s=3600.0, max_bytes=MAX_BYTES)
    newest, oldest = recs[-1], recs[1]
    assert oldest.topic == "telemetry"
    assert oldest.session == newest.session == 2
    assert _seqs(await ob.held(newest.topic, 2, newest.seq, newest.seq)) == [newest.seq]
    assert await ob.held("telemetry", 2, oldest.seq, oldest.seq) == []
    await h.close(ob)


async def test_held_includes_what_is_still_pending_and_not_yet_on_disk(tmp_path: Path) -> None:
    h = Harness(tmp_path / "mqtt-outbox")
    ob = await _open(h, retention_s=3600.0)
    recs = await _filled(ob, 200)
    late = add(ob, "telemetry", 999)  # not journaled yet: held all the same (it will go out)
    tele = [r for r in [*recs, late] if r.topic == "telemetry"]
    got = await ob.held("telemetry", 1, 0, late.seq)
    assert _seqs(got) == _seqs(tele)
    await h.close(ob)


async def test_compaction_keeps_the_held_segments(tmp_path: Path) -> None:
    h = Harness(tmp_path / "mqtt-outbox")
    ob = await _open(h, retention_s=3600.0)
    first = await _filled(ob, 1500)
    for rec in first:
        ob.ack(rec)
    await h.close(ob)
    ob = await _open(h, retention_s=3600.0)
    # An outage long enough to thin (and so compact) what is pending.
    while not ob.thinned:
        rec = add(ob, "telemetry")
        if rec.seq % 100 == 0:
            await journaled(ob, rec)
    await journaled(ob, add(ob, "events"))
    tele = [r for r in first if r.topic == "telemetry"]
    got = await ob.held("telemetry", 1, tele[0].seq, tele[-1].seq)
    assert _seqs(got) == _seqs(tele)
    await h.close(ob)
