"""The MQTT outbox (daemon/mqtt/outbox.py): sessions, per-topic seq across restarts and
crashes, replay of what the broker never acknowledged, journal damage (torn tail, garbled
lines, garbled state.json), thinning under the byte bound, compaction and segment deletion.

Every restart test reads back what the outbox put on disk by opening a new Outbox on the
same directory, and the on-disk files are also read independently (orjson per line).
A "crash" is an Outbox whose run task is cancelled between disk batches and that is never
closed: what is on disk is exactly what a killed process would leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from iortd.daemon.mqtt import outbox as outbox_mod
from iortd.daemon.mqtt.outbox import RESERVE_BLOCK, STREAM_TOPICS, Outbox, OutboxError, Record
from iortd.daemon.mqtt.payloads import SEQ_MAX, TOPICS, Envelope, Payload

TS = "2026-01-01T00:00:00.000000Z"
MAX_BYTES = 1024 * 1024  # the smallest bound the config allows
SMALL_MAX = 200_000  # small enough to thin quickly (Outbox itself takes any int)
TIMEOUT_S = 5.0
RETAINED = tuple(t for t in TOPICS if t not in STREAM_TOPICS)


# ---- helpers -------------------------------------------------------------------------


class Harness:
    """Opens outboxes on one directory with their run task, and closes or "crashes" them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tasks: dict[Outbox, asyncio.Task[None]] = {}

    async def open(self, max_bytes: int = MAX_BYTES) -> Outbox:
        ob = await Outbox.open(self.directory, max_bytes)
        self.tasks[ob] = asyncio.create_task(ob.run(), name="outbox-run")
        return ob

    async def close(self, ob: Outbox) -> None:
        task = self.tasks[ob]  # left to the fixture's teardown if close() fails
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await ob.close()
                await task
        except TimeoutError:
            pytest.fail(f"Outbox.close() or run() did not end within {TIMEOUT_S} s")
        del self.tasks[ob]

    async def crash(self, ob: Outbox) -> None:
        """Stop the run task between disk batches (holding the outbox's I/O lock, so no
        write, fsync or state save is half done) and never close: a killed process."""
        task = self.tasks.pop(ob)
        try:
            async with asyncio.timeout(TIMEOUT_S), ob._io:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        except TimeoutError:
            pytest.fail(f"the outbox's disk batch did not end within {TIMEOUT_S} s")


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "mqtt-outbox")
    yield h
    for task in h.tasks.values():
        task.cancel()
    await asyncio.gather(*h.tasks.values(), return_exceptions=True)


def make(ob: Outbox, topic: str, x: int = 0) -> Payload:
    """A payload of ``topic`` with the next seq of ``topic`` and this session."""
    env = Envelope(seq=ob.next_seq(topic), session=ob.session, ts=TS, sim=True)
    return {**env.fields(), "x": x}


def add(ob: Outbox, topic: str, x: int = 0) -> Record:
    return ob.add(topic, make(ob, topic, x))


async def journaled(ob: Outbox, rec: Record) -> None:
    """``rec`` is durable, and so is every stream record made before it. A state record
    is never journaled (its seq is durable by its topic's saved block)."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            if rec.retained:
                await ob.wait_publishable(rec)
                for before in [r for r in ob.pending if r.n < rec.n]:
                    await ob.wait_journaled(before)
            else:
                await ob.wait_journaled(rec)
    except TimeoutError:
        pytest.fail(f"record n={rec.n} ({rec.topic} seq {rec.seq}) not journaled in time")


def key(rec: Record) -> tuple[int, str, int, int]:
    return (rec.n, rec.topic, rec.session, rec.seq)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("outbox-*.jsonl"))


def journal_lines(directory: Path) -> list[dict[str, Any]]:
    """Every line of every segment, read independently of the outbox."""
    return [orjson.loads(line) for p in segments(directory) for line in p.read_bytes().splitlines()]


def line(n: int, topic: str, payload: Payload) -> bytes:
    """One journal line as documented: {"n": n, "t": topic, "r": retained, "p": payload}."""
    retained = TOPICS[topic].retain
    return orjson.dumps({"n": n, "t": topic, "r": retained, "p": payload}) + b"\n"


def hand_payload(seq: int, session: int = 1) -> Payload:
    return {**Envelope(seq=seq, session=session, ts=TS).fields(), "x": seq}


def state(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((directory / "state.json").read_bytes())
    return loaded


def damaged(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [e["problem"] for e in logs if e["event"] == "mqtt_outbox_damaged"]


async def fill_until_thinned(
    ob: Outbox, *, event_every: int = 10, batch: int = 100
) -> tuple[list[Record], list[Record]]:
    """Add telemetry (and an event every ``event_every``) in journaled batches until the
    first thinning; the bound must hold after every add. Returns (telemetry, events)."""
    telemetry: list[Record] = []
    events: list[Record] = []
    for i in range(50_000):
        if i % event_every == event_every - 1:
            events.append(add(ob, "events", i))
        else:
            telemetry.append(add(ob, "telemetry", i))
        assert ob.pending_bytes <= ob.max_bytes, f"bound broken after record {i}"
        if ob.thinned:
            return telemetry, events
        if i % batch == batch - 1:
            await journaled(ob, _last(telemetry, events))
    pytest.fail("never thinned")


def _last(telemetry: list[Record], events: list[Record]) -> Record:
    return max(telemetry[-1:] + events[-1:], key=lambda r: r.n)


# ---- sessions and seq ------------------------------------------------------------------


async def test_fresh_directory_is_session_1_with_seq_from_0_and_state_saved_at_open(
    harness: Harness,
) -> None:
    assert not harness.directory.exists()
    ob = await harness.open()
    assert ob.session == 1
    # Persisted before anything is sent: the next start cannot reuse session 1.
    assert state(harness.directory) == {
        "session": 1,
        "next_n": 0,
        "acked_through": -1,
        "next_seq": dict.fromkeys(TOPICS, 0),
        "reserved": dict.fromkeys(TOPICS, 0),  # no block until a topic's first use
    }
    assert [ob.next_seq(t) for t in TOPICS] == [0] * len(TOPICS)
    assert [ob.next_seq("telemetry"), ob.next_seq("telemetry")] == [1, 2]
    assert ob.next_seq("events") == 1  # per topic
    assert not ob.pending
    assert list(ob.unsent()) == []
    assert ob.recovered == 0
    await harness.close(ob)


async def test_restart_after_close_is_next_session_and_seq_continues_for_every_topic(
    harness: Harness,
) -> None:
    counts = {
        "telemetry": 5,
        "applicator": 2,
        "events": 3,
        "status": 2,
        "interlocks": 1,
        "delivery": 4,
        "audit/checkpoint": 1,
        "alarms": 2,
        "skip": 1,
    }
    assert set(counts) == set(TOPICS)
    ob = await harness.open()
    recs = [add(ob, t, i) for t, c in counts.items() for i in range(c)]
    await journaled(ob, recs[-1])
    for rec in recs:
        ob.ack(rec)
    ob.next_seq("delivery")  # allocated, never added: must not be reused either
    await harness.close(ob)

    ob2 = await harness.open()
    assert ob2.session == 2
    expected = {**counts, "delivery": counts["delivery"] + 1}
    assert {t: ob2.next_seq(t) for t in TOPICS} == expected
    await harness.close(ob2)

    ob3 = await harness.open()
    assert ob3.session == 3
    # Seqs handed out and never journaled are declared: the samples' (their seqs could
    # have gone out from memory), under skip's own seqs (2 and 3).
    declared = [r.payload["skipped"] for r in ob3.pending if r.topic == "skip"]
    assert [(d["topic"], d["session"], d["first"], d["last"]) for d in declared] == [
        ("telemetry", 2, 5, 5),
        ("applicator", 2, 2, 2),
    ]
    after = {**{t: c + 1 for t, c in expected.items()}, "skip": expected["skip"] + 3}
    assert {t: ob3.next_seq(t) for t in TOPICS} == after
    await harness.close(ob3)


def _exhausted_state(directory: Path, **changes: Any) -> None:
    directory.mkdir(exist_ok=True)
    # The counter stays a 64-bit value, so the last seq handed out is SEQ_MAX - 1.
    raw = {"session": 1, "next_n": 0, "acked_through": -1, "next_seq": {"events": SEQ_MAX - 1}}
    (directory / "state.json").write_bytes(orjson.dumps({**raw, **changes}))


async def test_next_seq_refuses_to_wrap(harness: Harness) -> None:
    _exhausted_state(harness.directory)
    ob = await harness.open()
    assert ob.next_seq("events") == SEQ_MAX - 1
    with pytest.raises(OverflowError, match="events"):
        ob.next_seq("events")
    with pytest.raises(OverflowError, match="events"):
        ob.next_seq("events")  # and stays refused
    assert ob.next_seq("telemetry") == 0  # other topics are unaffected
    await harness.crash(ob)


async def test_session_counter_exhaustion_is_an_outbox_error(harness: Harness) -> None:
    _exhausted_state(harness.directory, session=SEQ_MAX)
    with pytest.raises(OutboxError, match="session counter exhausted"):
        await Outbox.open(harness.directory, MAX_BYTES)


async def test_state_is_still_saved_after_the_last_seq_is_allocated(harness: Harness) -> None:
    _exhausted_state(harness.directory)
    ob = await harness.open()
    assert ob.next_seq("events") == SEQ_MAX - 1
    await harness.close(ob)
    ob2 = await harness.open()
    with pytest.raises(OverflowError, match="events"):
        ob2.next_seq("events")  # never wraps to a repeated seq, also after a restart
    await harness.close(ob2)


async def test_unusable_directory_is_an_outbox_error_naming_it(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(OutboxError, match=str(not_a_dir)):
        await Outbox.open(not_a_dir, MAX_BYTES)


# ---- journaling, unsent, ack -----------------------------------------------------------


async def test_records_are_publishable_only_once_durable_and_the_line_format(
    harness: Harness,
) -> None:
    ob = await harness.open()
    t0 = add(ob, "telemetry", 0)
    s0 = add(ob, "status", 1)
    e0 = add(ob, "events", 2)
    t1 = add(ob, "telemetry", 3)
    # Nothing is on disk yet (the run task has not had a turn): no block of seqs saved,
    # no event journaled, nothing to publish.
    assert not any(r.journaled for r in (t0, s0, e0, t1))
    assert list(ob.unsent()) == []
    assert list(ob.pending) == [t0, e0, t1]  # retained records are not queued
    assert ob.pending_bytes == len(t0.line) + len(e0.line) + len(t1.line)
    await journaled(ob, t1)
    assert ob.changed.is_set()
    assert not s0.journaled  # a state message is never journaled: its block is durable
    assert ob.publishable(s0)
    assert list(ob.unsent()) == [t0, e0, t1]
    ob.ack(e0)  # out of order: skipped by unsent, still pending (t0 is not acked)
    assert list(ob.unsent()) == [t0, t1]
    assert list(ob.pending) == [t0, e0, t1]
    assert ob.acked_through == -1
    assert ob.pending_bytes == len(t0.line) + len(t1.line)
    ob.ack(t0)
    assert list(ob.pending) == [t1]
    assert ob.acked_through == e0.n
    ob.ack(t0)  # twice is harmless
    assert ob.pending_bytes == len(t1.line)

    # On disk, in order: {"n", "t", "r", "p"}, the payload as given, fsync'd before use.
    assert journal_lines(harness.directory) == [
        {"n": r.n, "t": r.topic, "r": r.retained, "p": r.payload} for r in (t0, e0, t1)
    ]
    assert [p.name for p in segments(harness.directory)] == [f"outbox-{t0.n:016d}.jsonl"]
    assert [r.n for r in (t0, s0, e0, t1)] == [0, 1, 2, 3]
    await harness.close(ob)


async def test_live_record_wire_bytes(harness: Harness) -> None:
    ob = await harness.open()
    payload = make(ob, "telemetry", 7)
    rec = ob.add("telemetry", payload)
    assert rec.body == orjson.dumps(payload)
    assert rec.wire(historical=False) == rec.body
    assert orjson.loads(rec.wire(historical=True)) == {**payload, "historical": True}
    assert rec.created_ns > 0
    await harness.close(ob)


# ---- restart: replay -------------------------------------------------------------------


async def test_unacked_stream_records_are_replayed_after_restart_in_order(
    harness: Harness,
) -> None:
    ob = await harness.open()
    t0 = add(ob, "telemetry", 0)
    e0 = add(ob, "events", 1)
    s0 = add(ob, "status", 2)
    t1 = add(ob, "telemetry", 3)
    t2 = add(ob, "telemetry", 4)
    e1 = add(ob, "events", 5)
    t3 = add(ob, "telemetry", 6)
    s1 = add(ob, "interlocks", 7)  # retained, never acked: still never replayed
    await journaled(ob, s1)
    for rec in (t0, e0, s0, t1):
        ob.ack(rec)
    assert ob.acked_through == t1.n
    await harness.close(ob)
    assert state(harness.directory)["acked_through"] == t1.n

    ob2 = await harness.open()
    assert ob2.session == 2
    left = [t2, e1, t3]
    assert [key(r) for r in ob2.pending] == [key(r) for r in left]
    assert [key(r) for r in ob2.unsent()] == [key(r) for r in left]
    assert ob2.recovered == 3
    assert ob2.pending_bytes == sum(len(r.line) for r in left)
    for old, new in zip(left, ob2.pending, strict=True):
        assert new.session == 1
        assert new.created_ns == -1
        assert new.journaled
        assert not new.done
        assert not new.retained
        assert new.payload == old.payload
        assert new.wire(historical=False) == old.body  # the original bytes
        assert orjson.loads(new.wire(historical=True)) == {**old.payload, "historical": True}
    # The new session's records come after the replayed ones and have new n and seq.
    t4 = add(ob2, "telemetry", 8)
    assert t4.n > t3.n
    assert (t4.session, t4.seq) == (2, t3.seq + 1)
    await journaled(ob2, t4)
    assert [key(r) for r in ob2.unsent()] == [key(r) for r in [*left, t4]]
    await harness.close(ob2)


async def test_acks_out_of_order_never_let_an_unacked_record_go_unreplayed(
    harness: Harness,
) -> None:
    ob = await harness.open()
    recs = [add(ob, "telemetry" if i % 3 else "events", i) for i in range(6)]
    await journaled(ob, recs[-1])
    # Acked: 0, 1, 3, 4 (3 and 4 out of order, after the unacked 2); unacked: 2, 5.
    for i in (0, 1, 3, 4):
        ob.ack(recs[i])
    assert ob.acked_through == recs[1].n  # the longest acknowledged prefix
    await harness.close(ob)

    ob2 = await harness.open()
    replayed = [key(r) for r in ob2.pending]
    # Every unacked record is replayed, nothing of the acknowledged prefix is. Records
    # acked after the first unacked one (3, 4) are replayed too: acked_through is a
    # prefix, and consumers drop the repeated (session, seq).
    assert replayed == [key(recs[i]) for i in (2, 3, 4, 5)]
    # Acknowledging the rest settles everything, whatever the order.
    for rec in reversed(list(ob2.pending)):
        ob2.ack(rec)
    assert not ob2.pending
    await harness.close(ob2)
    ob3 = await harness.open()
    assert not ob3.pending
    assert ob3.next_seq("telemetry") == 4
    assert ob3.next_seq("events") == 2
    await harness.close(ob3)


async def test_segments_are_deleted_once_everything_in_them_is_acknowledged(
    harness: Harness,
) -> None:
    # max_bytes 1 MiB: segments rotate at 128 KiB; ~400 KB of records make several.
    ob = await harness.open(MAX_BYTES)
    recs: list[Record] = []
    for i in range(3000):
        recs.append(add(ob, "events" if i % 7 == 0 else "telemetry", i))
        if i % 17 == 0:
            recs.append(add(ob, "status", i))
        if i % 100 == 99:
            await journaled(ob, recs[-1])
    await journaled(ob, recs[-1])
    assert ob.thinned == 0
    segs = segments(harness.directory)
    assert len(segs) >= 3, "the test needs several segments"
    firsts = [int(p.name[7:23]) for p in segs]
    # Acknowledge everything up to and including the first record of the third segment.
    cut = firsts[2]
    for rec in recs:
        if rec.n <= cut:
            ob.ack(rec)
    await harness.close(ob)
    assert segments(harness.directory) == segs[2:]  # the fully acknowledged ones are gone

    ob2 = await harness.open(MAX_BYTES)
    stream = [r for r in recs if not r.retained]
    assert [key(r) for r in ob2.pending] == [key(r) for r in stream if r.n > cut]
    for rec in list(ob2.pending):
        ob2.ack(rec)
    await harness.close(ob2)
    assert segments(harness.directory) == []
    assert state(harness.directory)["acked_through"] == recs[-1].n

    ob3 = await harness.open(MAX_BYTES)
    assert not ob3.pending
    assert ob3.session == 3
    for topic in ("telemetry", "events", "status"):
        assert ob3.next_seq(topic) == 1 + max(r.seq for r in recs if r.topic == topic)
    await harness.close(ob3)


# ---- crash ---------------------------------------------------------------------------


async def test_after_a_crash_seq_continues_above_everything_journaled_and_replays(
    harness: Harness,
) -> None:
    ob = await harness.open()
    recs = [add(ob, t, i) for i in range(4) for t in ("telemetry", "status", "events")]
    recs.append(add(ob, "delivery", 99))
    await journaled(ob, recs[-1])
    await harness.crash(ob)
    # The blocks of the topics used are saved; events are known from the journal only.
    reserved = state(harness.directory)["reserved"]
    used = ("telemetry", "status", "delivery")
    assert {t for t, r in reserved.items() if r} == set(used)
    assert all(RESERVE_BLOCK <= reserved[t] <= RESERVE_BLOCK + 4 for t in used)

    ob2 = await harness.open()
    assert ob2.session == 2
    assert ob2.next_seq("telemetry") == reserved["telemetry"]  # above the block
    assert ob2.next_seq("events") == 4  # journal-first: above the journal, no hole
    assert ob2.next_seq("status") == reserved["status"]
    assert ob2.next_seq("delivery") == reserved["delivery"]
    assert ob2.next_seq("interlocks") == 0  # never used: no block
    replay = [key(r) for r in ob2.pending if r.topic != "skip"]
    assert replay == [key(r) for r in recs if not r.retained]
    # The journal holds telemetry up to seq 3: the rest of the block is declared.
    [skip] = [r.payload["skipped"] for r in ob2.pending if r.topic == "skip"]
    assert skip == {
        "topic": "telemetry", "session": 1, "first": 4, "last": reserved["telemetry"] - 1,
        "reason": "unpublished",
    }  # fmt: skip
    await harness.close(ob2)


async def test_after_a_crash_the_periodically_saved_acked_prefix_is_not_replayed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_mod, "STATE_SAVE_INTERVAL_S", 0.0)  # save at every batch
    ob = await harness.open()
    recs = [add(ob, "telemetry", i) for i in range(5)]
    await journaled(ob, recs[-1])
    ob.ack(recs[0])
    ob.ack(recs[1])
    last = add(ob, "events", 5)
    await journaled(ob, last)  # that batch saves acked_through (crash waits for it)
    await harness.crash(ob)
    assert state(harness.directory)["acked_through"] == recs[1].n

    ob2 = await harness.open()
    replay = [key(r) for r in ob2.pending if r.topic != "skip"]
    assert replay == [key(r) for r in [*recs[2:], last]]
    assert ob2.next_seq("telemetry") == state(harness.directory)["reserved"]["telemetry"]
    await harness.close(ob2)


async def test_acked_prefix_not_yet_saved_is_replayed_after_a_crash_never_lost(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_mod, "STATE_SAVE_INTERVAL_S", 3600.0)
    ob = await harness.open()
    recs = [add(ob, "telemetry", i) for i in range(5)]
    await journaled(ob, recs[-1])
    ob.ack(recs[0])
    ob.ack(recs[1])
    last = add(ob, "events", 5)
    await journaled(ob, last)
    await harness.crash(ob)
    ob2 = await harness.open()
    replay = [key(r) for r in ob2.pending if r.topic != "skip"]
    assert replay == [key(r) for r in [*recs, last]]
    await harness.close(ob2)


# ---- damage ----------------------------------------------------------------------------


async def test_torn_tail_of_the_last_segment_is_truncated_and_the_rest_kept(
    harness: Harness,
) -> None:
    ob = await harness.open()
    recs = [add(ob, "telemetry", i) for i in range(3)]
    await journaled(ob, recs[-1])
    await harness.close(ob)
    [seg] = segments(harness.directory)
    intact = seg.read_bytes()
    torn = line(3, "telemetry", hand_payload(3))[:-12]  # a write cut short by a crash
    seg.write_bytes(intact + torn)

    with capture_logs() as logs:
        ob2 = await harness.open()
    assert seg.read_bytes() == intact
    assert [key(r) for r in ob2.pending] == [key(r) for r in recs]
    assert ob2.next_seq("telemetry") == 3
    [problem] = damaged(logs)
    assert "torn tail dropped" in problem
    assert "line 4" in problem
    assert not (harness.directory / "quarantine").exists()
    await harness.close(ob2)


async def test_torn_only_line_leaves_no_segment(harness: Harness) -> None:
    d = harness.directory
    d.mkdir()
    seg = d / f"outbox-{0:016d}.jsonl"
    seg.write_bytes(line(0, "events", hand_payload(0))[:20])
    with capture_logs() as logs:
        ob = await harness.open()
    assert not ob.pending
    assert ob.session == 1
    assert not seg.exists()  # truncated to nothing, then removed as empty
    assert len(damaged(logs)) == 1
    await harness.close(ob)


def _events_lines(ns: range, session: int = 1) -> bytes:
    return b"".join(line(n, "events", hand_payload(n, session)) for n in ns)


@pytest.mark.parametrize(
    ("first", "second", "bad", "kept"),
    [
        # garbled line in the middle of the first of two segments
        (
            _events_lines(range(2)) + b"not json at all\n" + _events_lines(range(3, 4)),
            _events_lines(range(4, 6)),
            "first",
            [0, 1, 3, 4, 5],
        ),
        # a non-last segment whose last line has no newline is damage, not a torn tail
        (
            _events_lines(range(3)) + _events_lines(range(3, 4))[:-9],
            _events_lines(range(4, 6)),
            "first",
            [0, 1, 2, 4, 5],
        ),
        # a line of the wrong shape followed by more lines, in the last segment
        (
            _events_lines(range(4)),
            _events_lines(range(4, 5))
            + b'{"n": 5, "t": "nope", "r": false, "p": {}}\n'
            # read past the bad line: only the bad line is lost
            + _events_lines(range(6, 7)),
            "second",
            [0, 1, 2, 3, 4, 6],
        ),
        # a complete but garbled last line is not a torn write either
        (
            _events_lines(range(4)),
            _events_lines(range(4, 5)) + b"\x00\x00\x00\n",
            "second",
            [0, 1, 2, 3, 4],
        ),
    ],
    ids=["middle-of-first", "unterminated-non-last", "wrong-shape-in-last", "garbage-last"],
)
async def test_garbled_segment_is_quarantined_keeping_every_readable_line(
    harness: Harness, first: bytes, second: bytes, bad: str, kept: list[int]
) -> None:
    d = harness.directory
    d.mkdir()
    names = {"first": f"outbox-{0:016d}.jsonl", "second": f"outbox-{4:016d}.jsonl"}
    (d / names["first"]).write_bytes(first)
    (d / names["second"]).write_bytes(second)
    original = first if bad == "first" else second

    with capture_logs() as logs:
        ob = await harness.open()
    assert [r.n for r in ob.pending] == kept
    assert [r.seq for r in ob.pending] == kept
    assert not (d / names[bad]).exists()
    [moved] = list((d / "quarantine").iterdir())
    assert moved.name.startswith(names[bad] + ".")
    assert moved.read_bytes() == original  # set aside untouched, never deleted
    good = "second" if bad == "first" else "first"
    assert (d / names[good]).read_bytes() == (second if bad == "first" else first)
    [problem] = damaged(logs)
    assert str(d / names[bad]) in problem
    assert "every other line was kept" in problem
    assert ob.session == 2
    assert ob.next_seq("events") > max(kept)
    await harness.close(ob)
    assert moved.exists()


async def test_records_kept_from_a_quarantined_segment_survive_another_restart(
    harness: Harness,
) -> None:
    d = harness.directory
    d.mkdir()
    (d / f"outbox-{0:016d}.jsonl").write_bytes(
        _events_lines(range(2)) + b"garbled\n" + _events_lines(range(3, 4))
    )
    (d / f"outbox-{4:016d}.jsonl").write_bytes(_events_lines(range(4, 5)))
    with capture_logs():
        ob = await harness.open()
    assert [r.n for r in ob.pending] == [0, 1, 3, 4]
    await harness.close(ob)  # the broker never acked them (e.g. it was down)

    ob2 = await harness.open()
    assert [r.n for r in ob2.pending] == [0, 1, 3, 4], "events 0, 1 and 3 were silently lost"
    await harness.close(ob2)


@pytest.mark.parametrize(
    "garbage",
    [
        b"{garbled",
        b"",
        b"[]",
        b'{"session": 1}',
        b'{"session": true, "next_n": 0, "acked_through": -1, "next_seq": {}}',
        b'{"session": 1, "next_n": 0, "acked_through": -1, "next_seq": []}',
        b'{"session": 1, "next_n": 0, "acked_through": -1, "next_seq": {"events": "x"}}',
    ],
    ids=["json", "empty", "array", "missing", "bool", "seq-list", "seq-str"],
)
async def test_garbled_state_is_quarantined_and_the_journal_still_rules(
    harness: Harness, garbage: bytes
) -> None:
    ob = await harness.open()
    first = [add(ob, "telemetry", i) for i in range(3)] + [add(ob, "status", 9)]
    await journaled(ob, first[-1])
    await harness.close(ob)
    ob2 = await harness.open()  # session 2
    second = [add(ob2, "telemetry", i) for i in range(2)] + [add(ob2, "events", 9)]
    ob2.ack(first[0])
    await journaled(ob2, second[-1])
    await harness.close(ob2)
    d = harness.directory
    # Both the state and the previous state it keeps are garbled: the journal rules.
    (d / "state.json").write_bytes(garbage)
    (d / "state.copy.json").write_bytes(garbage)

    with capture_logs() as logs:
        ob3 = await harness.open()
    moved = sorted(p.name for p in (d / "quarantine").iterdir())
    assert sorted(m.split(".json.")[0] for m in moved) == ["state", "state.copy"]
    assert all((d / "quarantine" / m).read_bytes() == garbage for m in moved)
    assert state(d)["session"] == ob3.session  # a fresh state.json, saved at open
    assert ob3.session == 3  # above every session in the journal
    # The blocks are lost with the state: a topic published from memory starts well
    # above its journal (no block reaches further than one beyond what was handed out);
    # events, journal-first, just above the journal.
    assert ob3.next_seq("telemetry") == 5 + 2 * RESERVE_BLOCK
    assert ob3.next_seq("events") == 1
    assert ob3.next_seq("status") == 0 + 2 * RESERVE_BLOCK
    # acked_through is lost with the state: the whole journal is replayed, including
    # first[0], which was acknowledged (consumers drop the repeat); nothing is lost.
    stream = [r for r in first + second if not r.retained]
    assert [key(r) for r in ob3.pending] == [key(r) for r in stream]
    problems = damaged(logs)
    assert any("state.json" in p for p in problems)
    assert any("state.copy.json" in p for p in problems)
    await harness.close(ob3)


async def test_an_unreadable_state_falls_back_to_its_copy(harness: Harness) -> None:
    """Counters outlive a damaged state.json: segments that are gone took their seqs with
    them, and only the state (kept twice) still knows them."""
    ob = await harness.open()
    recs = [add(ob, "events", i) for i in range(5)]
    await journaled(ob, recs[-1])
    for r in recs:
        ob.ack(r)
    await harness.close(ob)  # every segment retired: only the state knows seq 5
    ob2 = await harness.open()  # session 2
    more = [add(ob2, "events", i) for i in range(4)]  # seqs 5..8, acknowledged, retired
    await journaled(ob2, more[-1])
    for r in more:
        ob2.ack(r)
    await harness.close(ob2)
    d = harness.directory
    assert list(d.glob("outbox-*.jsonl")) == []
    (d / "state.json").write_bytes(b"{garbled")
    with capture_logs() as logs:
        ob3 = await harness.open()
    assert ob3.session == 3
    assert ob3.next_seq("events") == 9, "seq continues from the copy: nothing repeats"
    assert any("copy of the state was used" in p for p in damaged(logs))
    await harness.close(ob3)


async def test_a_garbled_line_pushes_every_seq_past_it(harness: Harness) -> None:
    """An unreadable line may have held the highest seq of any topic (published, then the
    bits rotted): recovery skips past it for every topic, never reusing a seq."""
    ob = await harness.open()
    recs = [add(ob, "delivery", 0), add(ob, "events", 0)]
    await journaled(ob, recs[-1])
    await harness.crash(ob)  # no state save since open: only the journal knows these
    d = harness.directory
    [seg] = list(d.glob("outbox-*.jsonl"))
    lines = seg.read_bytes().splitlines(keepends=True)
    seg.write_bytes(b"".join(x if b'"delivery"' not in x else b"\x00rot\n" for x in lines))
    with capture_logs():
        ob2 = await harness.open()
    assert ob2.next_seq("delivery") >= 1, "the rotted delivery seq 0 is not handed out again"
    assert ob2.next_seq("events") >= 1
    await harness.close(ob2)


# ---- the bound: thinning and compaction -------------------------------------------------


async def test_first_thinning_drops_every_second_oldest_sample_just_enough(
    harness: Harness,
) -> None:
    ob = await harness.open(SMALL_MAX)
    with capture_logs() as logs:
        telemetry, events = await fill_until_thinned(ob)
    k = ob.thinned
    dropped = [r for r in telemetry if r.done]
    # Every second sample, oldest first: samples 0, 2, 4, ..., and nothing else.
    assert dropped == telemetry[0 : 2 * k : 2]
    assert all(r in ob.pending for r in telemetry if not r.done)
    assert all(r in ob.pending and not r.done for r in events)  # events never dropped
    low = SMALL_MAX * 3 // 4
    # Below 3/4 of the bound, not counting the skip that declares the thinned range.
    declared = sum(len(r.line) for r in ob.pending if r.topic == "skip")
    assert 0 < declared < 500
    assert ob.pending_bytes - declared <= low
    assert ob.pending_bytes - declared + len(dropped[-1].line) > low  # no more than needed
    assert ob.pending_bytes == sum(len(r.line) for r in ob.pending)
    [warning] = [e for e in logs if e["event"] == "mqtt_outbox_thinned"]
    assert warning["dropped_samples"] == k
    assert warning["telemetry_seq_first"] == telemetry[0].seq
    assert warning["telemetry_seq_last"] == telemetry[2 * k - 2].seq

    # The journal is compacted: on disk, exactly what is still pending.
    await journaled(ob, ob.pending[-1])
    on_disk = [e["n"] for e in journal_lines(harness.directory)]
    assert on_disk == [r.n for r in ob.pending]
    await harness.close(ob)


async def test_bound_holds_under_a_long_outage_and_thinned_samples_never_come_back(
    harness: Harness,
) -> None:
    ob = await harness.open(SMALL_MAX)
    telemetry: list[Record] = []
    events: list[Record] = []
    for i in range(6000):
        if i % 50 == 0:
            events.append(add(ob, "events", i))
        else:
            telemetry.append(add(ob, "telemetry", i))
        assert ob.pending_bytes <= SMALL_MAX, f"bound broken after record {i}"
        if i % 100 == 99:
            await journaled(ob, _last(telemetry, events))
    await journaled(ob, _last(telemetry, events))
    assert ob.thinned > 0
    kept = [r for r in telemetry if not r.done]
    assert ob.thinned == len(telemetry) - len(kept)
    assert all(not r.done for r in events)
    samples_and_events = [r.n for r in ob.pending if r.topic != "skip"]
    assert samples_and_events == sorted(r.n for r in [*kept, *events])
    # The newest samples are all kept: each thinning drops every second sample of the
    # oldest part only, so at least the newest quarter of the bound is untouched.
    newest = (SMALL_MAX // 4) // max(len(r.line) for r in telemetry)
    assert all(not r.done for r in telemetry[-newest:])
    # ... and the thinning started with the oldest sample.
    assert telemetry[0].done
    before = [key(r) for r in ob.pending]
    await harness.close(ob)

    size = sum(p.stat().st_size for p in segments(harness.directory))
    assert size <= SMALL_MAX, f"{size} bytes of segments for a {SMALL_MAX} bound"
    ob2 = await harness.open(SMALL_MAX)
    assert [key(r) for r in ob2.pending] == before
    assert ob2.next_seq("telemetry") == telemetry[-1].seq + 1
    assert ob2.next_seq("events") == events[-1].seq + 1
    await harness.close(ob2)


async def test_only_events_pending_are_never_thinned(harness: Harness) -> None:
    ob = await harness.open(20_000)
    recs = [add(ob, "events", i) for i in range(300)]  # far above the bound
    await journaled(ob, recs[-1])
    add(ob, "events", 300)
    assert ob.thinned == 0
    assert len(ob.pending) == 301
    assert ob.pending_bytes > ob.max_bytes  # events are kept even above the bound
    await harness.close(ob)


async def test_seq_never_repeats_after_a_crash_following_compaction(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The crash comes before the periodic state save (1 s by default).
    monkeypatch.setattr(outbox_mod, "STATE_SAVE_INTERVAL_S", 3600.0)
    ob = await harness.open(SMALL_MAX)
    early = [add(ob, "status", i) for i in range(3)] + [add(ob, "events", i) for i in range(3)]
    await journaled(ob, early[-1])
    for rec in early:
        ob.ack(rec)  # published and acknowledged: the broker has seen these seqs
    telemetry, _ = await fill_until_thinned(ob, event_every=1_000_000)
    await journaled(ob, telemetry[-1])  # the batch after thinning compacts the journal
    highest = {
        t: max(r.seq for r in [*early, *telemetry] if r.topic == t)
        for t in TOPICS
        if any(r.topic == t for r in [*early, *telemetry])
    }
    await harness.crash(ob)

    ob2 = await harness.open(SMALL_MAX)
    got = {t: ob2.next_seq(t) for t in highest}
    assert all(got[t] > highest[t] for t in highest), f"next seq {got}, seen {highest}"
    await harness.close(ob2)


async def test_the_journal_thread_never_touches_what_the_loop_changes(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker thread writes while the event loop goes on adding and acknowledging:
    iterating ``pending`` there could die with 'deque mutated during iteration' (seen
    with a 32 MiB bound after ~300k adds). Compaction takes its snapshot on the loop."""
    loop_thread = threading.get_ident()
    off_loop: list[str] = []

    class WatchedDeque(deque[Record]):
        def __iter__(self) -> Iterator[Record]:
            if threading.get_ident() != loop_thread:
                off_loop.append(threading.current_thread().name)
            return super().__iter__()

    monkeypatch.setattr(outbox_mod, "deque", WatchedDeque)
    ob = await harness.open(SMALL_MAX)
    run_task = harness.tasks[ob]
    await fill_until_thinned(ob, event_every=1_000_000)
    late = add(ob, "telemetry", -1)
    waiter = asyncio.create_task(ob.wait_journaled(late))
    done, _ = await asyncio.wait(
        {waiter, run_task}, timeout=TIMEOUT_S, return_when="FIRST_COMPLETED"
    )
    waiter.cancel()
    assert run_task not in done, f"run() ended: {run_task.exception()!r}"
    assert waiter in done, "the record added after thinning was never journaled"
    assert ob.thinned > 0, "the test must have compacted the journal"
    assert off_loop == [], f"pending was iterated off the event loop in {off_loop}"
    await harness.close(ob)
