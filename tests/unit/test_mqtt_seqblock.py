"""The outbox's seq reservation (daemon/mqtt/outbox.py): samples published from memory,
events journal-first, a durable block of seqs per topic ahead of use, and the declared skip
of what a crashed run reserved and cannot vouch for.

The property test at the end cuts the power at many points: every ``os.fsync`` is
recorded (the file's size when it was synced), and a cut truncates each journal segment
to its last synced size and removes the ones never synced, which is what a power loss
may leave of writes the disk had not been asked to make durable. A consumer model
collects what was "published" (whatever the outbox let out) and checks that no
(topic, seq) ever carries two contents and that every seq is either published, replayed
or declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_mqtt_outbox import (
    SMALL_MAX,
    TIMEOUT_S,
    Harness,
    add,
    fill_until_thinned,
    harness,
    journaled,
)

from iortd.daemon.mqtt import outbox as outbox_mod
from iortd.daemon.mqtt.outbox import JOURNAL_FIRST, RESERVE_BLOCK, Outbox, Record

__all__ = ["harness"]  # the fixture, imported from the outbox's tests

SAMPLES = ("telemetry", "applicator")


async def publishable(ob: Outbox, rec: Record) -> None:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await ob.wait_publishable(rec)
    except TimeoutError:
        pytest.fail(f"{rec.topic} seq {rec.seq} not publishable within {TIMEOUT_S} s")


async def crash_with(harness: Harness, ob: Outbox, before: Callable[[], object]) -> None:
    """Hold the outbox's disk lock, do ``before`` (records it makes are never written),
    then stop the run task and never close: a SIGKILL right after ``before``."""
    task = harness.tasks.pop(ob)
    async with asyncio.timeout(TIMEOUT_S), ob._io:
        before()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def skips(ob: Outbox) -> list[dict[str, Any]]:
    return [r.payload["skipped"] for r in ob.pending if r.topic == "skip"]


def test_events_and_skips_are_journal_first_and_samples_are_not() -> None:
    assert set(JOURNAL_FIRST) == {"events", "skip"}
    assert RESERVE_BLOCK >= 100


async def test_a_sample_is_publishable_before_its_journal_commit(harness: Harness) -> None:
    ob = await harness.open()
    first = add(ob, "telemetry", 0)
    await publishable(ob, first)  # the session's first seq waits for its block, once
    t1 = add(ob, "telemetry", 1)
    a0 = add(ob, "applicator", 2)
    await publishable(ob, a0)
    t2 = add(ob, "telemetry", 3)
    # Inside the durable block: out at once, whether or not its journal commit has run.
    assert not t2.journaled
    assert t2 in list(ob.unsent())
    assert [r for r in ob.unsent() if r.topic == "telemetry"] == [first, t1, t2]
    await journaled(ob, t2)  # and journaled soon after, for replay
    await harness.close(ob)


async def test_an_event_waits_for_its_journal_but_no_sample_waits_behind_it(
    harness: Harness,
) -> None:
    ob = await harness.open()
    await publishable(ob, add(ob, "telemetry", 0))
    for rec in list(ob.unsent()):
        ob.ack(rec)
    async with ob._io:  # the journal commit cannot run
        e0 = add(ob, "events", 1)
        t1 = add(ob, "telemetry", 2)
        assert list(ob.unsent()) == [t1]
    await journaled(ob, e0)
    assert list(ob.unsent()) == [e0, t1]
    await harness.close(ob)


async def test_no_seq_goes_out_beyond_the_durable_block(harness: Harness) -> None:
    ob = await harness.open()
    async with ob._io:  # no state save can run: nothing is reserved yet
        t0 = add(ob, "telemetry", 0)
        s0 = add(ob, "status", 0)
        assert list(ob.unsent()) == []
        assert not ob.publishable(s0)
    await publishable(ob, t0)
    await publishable(ob, s0)
    # A burst past the block: the rest waits for the next block, then goes.
    burst = [add(ob, "telemetry", i) for i in range(RESERVE_BLOCK + 10)]
    assert not ob.publishable(burst[-1])
    await publishable(ob, burst[-1])
    state = orjson.loads((harness.directory / "state.json").read_bytes())
    assert state["reserved"]["telemetry"] > burst[-1].seq
    await harness.close(ob)


async def test_a_crash_declares_the_rest_of_the_block_and_replays_what_was_journaled(
    harness: Harness,
) -> None:
    ob = await harness.open()
    sent = [add(ob, "telemetry", i) for i in range(5)]
    ev = [add(ob, "events", i) for i in range(2)]
    await journaled(ob, ev[-1])
    await journaled(ob, sent[-1])
    lost: list[Record] = []
    # Three more samples published from memory, the crash before their commit.
    await crash_with(harness, ob, lambda: lost.extend(add(ob, "telemetry", 9) for _ in range(3)))
    assert all(ob.publishable(r) for r in lost)
    reserved = orjson.loads((harness.directory / "state.json").read_bytes())["reserved"]

    ob2 = await harness.open()
    assert ob2.session == 2
    replay = [(r.topic, r.session, r.seq) for r in ob2.pending if r.topic != "skip"]
    assert replay == [(r.topic, 1, r.seq) for r in (*sent, *ev)]
    # The lost three are inside the declared range; the new run starts above the block.
    assert skips(ob2) == [
        {
            "topic": "telemetry",
            "session": 1,
            "first": 5,
            "last": reserved["telemetry"] - 1,
            "reason": "unpublished",
        }
    ]
    assert all(5 <= r.seq < reserved["telemetry"] for r in lost)
    assert ob2.next_seq("telemetry") == reserved["telemetry"]
    assert ob2.next_seq("events") == 2  # events never went out unjournaled: no hole
    # The skip is journaled before the new session is saved, and goes out last.
    assert ob2.pending[-1].topic == "skip"
    assert ob2.pending[-1].journaled
    await harness.close(ob2)


async def test_a_clean_stop_declares_nothing_and_leaves_no_hole(harness: Harness) -> None:
    ob = await harness.open()
    recs = [add(ob, t, i) for i in range(3) for t in SAMPLES]
    await publishable(ob, recs[-1])
    for rec in recs:
        ob.ack(rec)
    await harness.close(ob)
    ob2 = await harness.open()
    assert skips(ob2) == []
    assert ob2.next_seq("telemetry") == 3
    assert ob2.next_seq("applicator") == 3
    await harness.close(ob2)


async def test_a_crash_that_repeats_before_the_skip_is_sent_declares_it_again(
    harness: Harness,
) -> None:
    ob = await harness.open()
    await publishable(ob, add(ob, "telemetry", 0))
    await crash_with(harness, ob, lambda: None)
    ob2 = await harness.open()
    first = skips(ob2)
    await crash_with(harness, ob2, lambda: None)  # the skip never reached the broker
    ob3 = await harness.open()
    assert ob3.session == 3
    # Replayed with its own session and seq, not lost; session 2 reserved no samples.
    again = [(r.session, r.payload["skipped"]) for r in ob3.pending if r.topic == "skip"]
    assert again == [(2, first[0])]
    await harness.close(ob3)


async def test_a_state_file_of_the_previous_format_declares_nothing(harness: Harness) -> None:
    ob = await harness.open()
    await publishable(ob, add(ob, "telemetry", 0))
    await harness.close(ob)
    path = harness.directory / "state.json"
    state = orjson.loads(path.read_bytes())
    del state["reserved"]
    path.write_bytes(orjson.dumps(state))
    (harness.directory / "state.copy.json").write_bytes(orjson.dumps(state))
    ob2 = await harness.open()
    assert skips(ob2) == []
    assert ob2.next_seq("telemetry") == 1
    await harness.close(ob2)


# ---- power loss at many points ------------------------------------------------------------


class PowerLost(OSError):
    """The power went during this fsync: it never completed, and nothing after it did."""


class PowerCut:
    """A disk that keeps only what an ``os.fsync`` made durable. The power goes at a random
    fsync (that one does not complete, nor does any later one, and the test publishes
    nothing more: the process is dead); :meth:`cut` then leaves the files as the disk
    would: each journal segment truncated to its last synced size (removed if never
    synced), ``state.json`` and its copy as of their last synced replacement."""

    def __init__(self, directory: Path, rng: random.Random, p: float) -> None:
        self.directory = directory
        self.rng, self.p = rng, p
        self.synced: dict[str, int] = {}  # segment -> durable size
        self.states: dict[str, bytes] = {}  # state file -> durable content
        self.lock = threading.Lock()
        self.real = os.fsync
        self.off = False
        self.armed = False  # set once the outbox is open (a cut during open is a retry)
        self.cuts = 0
        self.lost_during: list[str] = []  # what the fsync the power went in was for

    def fsync(self, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        with self.lock:
            if self.off or (self.armed and self.rng.random() < self.p):
                if not self.off:
                    self.lost_during.append(path.name.split(".")[0])
                self.off = True
                raise PowerLost(5, "power lost")
        self.real(fd)
        if path.parent != self.directory:
            return
        name = path.name.split(".", 2)  # a write_atomic temporary: NAME.EXT.PID.TID.tmp
        target = ".".join(name[:2])
        with self.lock:
            if path.name.endswith(".tmp"):
                data = path.read_bytes()
                if target.startswith("state"):
                    self.states[target] = data
                else:
                    self.synced[str(self.directory / target)] = len(data)
            elif target.startswith("outbox-"):
                self.synced[str(path)] = os.fstat(fd).st_size

    def cut(self) -> int:
        """Leave what the disk holds; returns the bytes of segments dropped. Power on."""
        dropped = 0
        with self.lock:
            self.cuts += self.off
            for seg in sorted(self.directory.glob("outbox-*.jsonl")):
                size = seg.stat().st_size
                keep = self.synced.get(str(seg), 0)
                dropped += size - keep
                if keep == 0:
                    seg.unlink()
                    self.synced.pop(str(seg), None)
                elif keep < size:
                    os.truncate(seg, keep)
            for name in ("state.json", "state.copy.json"):
                if name in self.states:
                    (self.directory / name).write_bytes(self.states[name])
                else:
                    (self.directory / name).unlink(missing_ok=True)
            self.off = self.armed = False
        return dropped


class Consumer:
    """What subscribers saw: (topic, seq) -> (session, body), and the declared ranges."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], tuple[int, bytes]] = {}
        self.declared: list[dict[str, Any]] = []

    def receive(self, rec: Record) -> None:
        key = (rec.topic, rec.seq)
        got = (rec.session, rec.body)
        old = self.seen.setdefault(key, got)
        assert old == got, f"{rec.topic} seq {rec.seq}: two contents {old} and {got}"
        if rec.topic == "skip":
            self.declared.append(rec.payload["skipped"])

    def accounted(self, topic: str) -> Iterator[int]:
        yield from (seq for (t, seq) in self.seen if t == topic)
        for d in self.declared:
            if d["topic"] == topic:
                yield from range(d["first"], d["last"] + 1)


def publish_some(ob: Outbox, consumer: Consumer, rng: random.Random, power: PowerCut) -> None:
    """The broker takes what the outbox lets out; acknowledges some of it. Nothing once
    the power is off."""
    for rec in list(ob.unsent()):
        if power.off:
            return
        if rng.random() < 0.8:
            consumer.receive(rec)
            if rng.random() < 0.7:
                ob.ack(rec)


@pytest.mark.timeout(120)
async def test_power_cuts_at_many_points_never_reuse_a_seq_and_leave_no_undeclared_hole(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(20261206)  # noqa: S311 - reproducible cut points, not crypto
    power = PowerCut(harness.directory, rng, 0.15)
    monkeypatch.setattr(os, "fsync", power.fsync)
    monkeypatch.setattr(outbox_mod, "COMMIT_INTERVAL_S", 0.002)
    consumer = Consumer()
    cuts = 60
    for _ in range(cuts):
        ob = await harness.open()
        power.armed = True
        for _step in range(rng.randrange(1, 6)):
            for _i in range(rng.randrange(0, 40)):
                topic = rng.choice(("telemetry", "telemetry", "applicator", "events"))
                add(ob, topic, rng.randrange(1000))
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0, 0.01))  # a commit or a block may land
            publish_some(ob, consumer, rng, power)
            if power.off:
                break
        # SIGKILL, or the power went: the disk holds what was synced.
        await crash_with(harness, ob, lambda: None)
        power.cut()
    ob = await harness.open()
    while list(ob.unsent()) or not all(ob.publishable(r) for r in ob.pending):
        for rec in list(ob.unsent()):
            consumer.receive(rec)
            ob.ack(rec)
        await asyncio.sleep(0.005)
    await harness.close(ob)
    assert power.cuts >= cuts // 4, f"only {power.cuts} of {cuts} runs lost power"
    # The power went while a journal batch and while a block (state.json) was being made
    # durable (a journal write cut short is also cut back by the outbox itself).
    kinds = {"journal" if k.startswith("outbox-") else k for k in power.lost_during}
    assert {"journal", "state"} <= kinds, power.lost_during
    assert consumer.declared, "some cut must leave a declared skip"
    for topic in ("telemetry", "applicator", "events"):
        got = set(consumer.accounted(topic))
        top = max(got, default=-1)
        holes = sorted(set(range(top + 1)) - got)
        assert not holes, f"{topic}: seqs neither published nor declared: {holes[:20]}"


# ---- thinning under the byte bound --------------------------------------------------------


async def test_thinning_declares_each_topics_dropped_range_after_the_samples_it_kept(
    harness: Harness,
) -> None:
    ob = await harness.open(SMALL_MAX)
    telemetry, _events = await fill_until_thinned(ob)
    dropped = [r for r in telemetry if r.done]
    declared = [r for r in ob.pending if r.topic == "skip"]
    assert [r.payload["skipped"] for r in declared] == [
        {
            "topic": "telemetry",
            "session": 1,
            "first": dropped[0].seq,
            "last": dropped[-1].seq,
            "reason": "thinned",
        }
    ]
    # Published after every sample it spans that was kept (they go first, in order).
    kept = [r for r in telemetry if not r.done and r.seq <= dropped[-1].seq]
    assert kept
    assert all(ob.pending.index(r) < ob.pending.index(declared[0]) for r in kept)
    await harness.close(ob)
