"""The queued adapter's rules, by hand: what overflows drop, what ``block`` waits for and
for how long, what a failing or hung callback costs, and the bounded drain at close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from iortd.daemon.sink_queue import QueuedSink
from iortd.daemon.sinks import ApplicatorSample, Sample, Sink
from iortd.daemon.tracker import DeliverySnapshot, TrackerEvent


def sample(n: int) -> Sample:
    # Only the identity of the object matters here: the adapter never looks inside.
    return Sample(device=f"d{n}", reading=None, delivery=None, interlocks={}, all_clear=True)  # type: ignore[arg-type]


class Gated(Sink):
    """Records calls; each waits for ``gate`` (open by default)."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[tuple[str, object]] = []
        self.entered = asyncio.Event()
        self.closed = False
        self.fail_on: set[object] = set()
        self.changed = asyncio.Event()

    async def until(self, n: int) -> None:
        """Wait until ``n`` calls have been delivered."""
        try:
            async with asyncio.timeout(5):
                while len(self.calls) < n:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{len(self.calls)} calls delivered, not {n}") from None

    async def _call(self, kind: str, what: object) -> None:
        self.entered.set()
        await self.gate.wait()
        if what in self.fail_on:
            raise RuntimeError(f"sink bug on {what}")
        self.calls.append((kind, what))
        self.changed.set()

    async def sample(self, sample: Sample) -> None:
        await self._call("sample", sample.device)

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        await self._call("events", events[0])

    async def notice(self, severity: str, message: str) -> None:
        await self._call("notice", message)

    async def aclose(self) -> None:
        self.closed = True


@contextlib.asynccontextmanager
async def running(q: QueuedSink) -> AsyncIterator[QueuedSink]:
    task = asyncio.create_task(q.run())
    try:
        yield q
    finally:
        async with asyncio.timeout(5):
            await q.aclose()
            await task


async def test_calls_reach_the_sink_in_order() -> None:
    inner = Gated()
    async with running(QueuedSink(inner)) as q:
        await q.sample(sample(1))
        await q.events(["e1"], None)  # type: ignore[list-item]
        await q.notice("info", "n1")
        await inner.until(3)
    assert inner.calls == [("sample", "d1"), ("events", "e1"), ("notice", "n1")]
    assert inner.closed


async def test_drop_oldest_drops_samples_first_and_reports_it() -> None:
    inner = Gated()
    inner.gate.clear()
    reports: list[Mapping[str, Any]] = []
    q = QueuedSink(inner, queue_size=3)
    q.on_overflow = reports.append
    async with running(q):
        await q.sample(sample(0))  # taken by the sink's task, which waits at the gate
        await inner.entered.wait()
        await q.sample(sample(1))
        await q.events(["e1"], None)  # type: ignore[list-item]
        await q.sample(sample(2))  # the queue is full now
        await q.sample(sample(3))  # the oldest sample (1) goes, the event stays
        assert q.dropped_total == 1
        assert reports == [
            {
                "sink": "gated",
                "policy": "drop_oldest",
                "queue_size": 3,
                "why": "queue full",
                "dropped": {"sample": 1},
                "dropped_total": 1,
            }
        ]
        inner.gate.set()
        await inner.until(4)
    assert inner.calls == [("sample", "d0"), ("events", "e1"), ("sample", "d2"), ("sample", "d3")]


async def test_with_no_sample_queued_a_new_sample_is_dropped_and_an_event_drops_the_oldest() -> (
    None
):
    inner = Gated()
    inner.gate.clear()
    q = QueuedSink(inner, queue_size=2)
    async with running(q):
        await q.notice("info", "busy")
        await inner.entered.wait()
        await q.events(["e1"], None)  # type: ignore[list-item]
        await q.events(["e2"], None)  # type: ignore[list-item]
        await q.sample(sample(1))  # dropped itself: the events stay
        await q.events(["e3"], None)  # type: ignore[list-item]  # pushes out e1
        assert q.dropped_total == 2
        inner.gate.set()
        await inner.until(3)
    assert [w for _, w in inner.calls] == ["busy", "e2", "e3"]


async def test_block_waits_for_room_then_stalls_and_drops_without_waiting() -> None:
    inner = Gated()
    inner.gate.clear()
    q = QueuedSink(inner, queue_size=1, overflow="block", timeout_s=5, block_s=0.2)
    async with running(q):
        await q.sample(sample(0))
        await inner.entered.wait()
        await q.sample(sample(1))  # fills the queue
        waiting = asyncio.create_task(q.sample(sample(2)))
        await asyncio.sleep(0.05)  # bounded: it must still be waiting for room
        assert not waiting.done(), "block waits for room"
        inner.gate.set()  # room again: the wait ends without a drop
        await waiting
        assert q.dropped_total == 0
        await inner.until(3)
        inner.gate.clear()
        inner.entered.clear()
        await q.sample(sample(3))
        await inner.entered.wait()
        await q.sample(sample(4))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await q.sample(sample(5))  # waits 0.2 s, then the sink counts as stalled
        assert loop.time() - t0 >= 0.15
        t1 = loop.time()
        await q.sample(sample(6))  # stalled: dropped at once
        assert loop.time() - t1 < 0.1
        assert q.dropped_total == 2
        inner.gate.set()


async def test_a_failing_or_hung_callback_costs_only_its_own_call() -> None:
    inner = Gated()
    inner.fail_on.add("d1")
    async with running(QueuedSink(inner, timeout_s=0.2)) as q:
        await q.sample(sample(1))
        await q.sample(sample(2))
        await inner.until(1)
        inner.gate.clear()
        await q.sample(sample(3))  # hangs: cut at timeout_s
        await q.sample(sample(4))
        await asyncio.sleep(0.05)
        inner.gate.set()
        await inner.until(2)
    assert ("sample", "d2") in inner.calls
    assert inner.calls[-1] == ("sample", "d4")


async def test_close_drains_within_its_bound_then_closes_the_sink() -> None:
    inner = Gated()
    inner.gate.clear()
    q = QueuedSink(inner, drain_s=0.2)
    task = asyncio.create_task(q.run())
    for i in range(5):
        await q.sample(sample(i))
    await inner.entered.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(5):
        await q.aclose()
        await task
    assert loop.time() - t0 < 1.0
    assert inner.closed
    await q.sample(sample(9))  # after close: dropped, counted, never delivered
    assert q.dropped_total == 1


class RunFails(Sink):
    name = "run-fails"

    async def run(self) -> None:
        raise RuntimeError("cannot connect, and a bug")


async def test_a_sink_whose_run_raises_does_not_raise_out_of_its_queue() -> None:
    q = QueuedSink(RunFails())
    task = asyncio.create_task(q.run())
    await asyncio.sleep(0)
    await q.aclose()
    async with asyncio.timeout(5):
        await task  # no exception


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        QueuedSink(Gated(), queue_size=0)


async def test_drop_reports_are_rate_limited_and_flushed_on_demand() -> None:
    now = [0.0]
    inner = Gated()
    inner.gate.clear()
    reports: list[Mapping[str, Any]] = []
    q = QueuedSink(inner, queue_size=1, clock=lambda: now[0])
    q.on_overflow = reports.append
    for i in range(5):  # not running: the first fills the queue, the others each drop one
        await q.sample(sample(i))
    assert [r["dropped"] for r in reports] == [{"sample": 1}], "the first drop at once"
    now[0] = 10.0
    await q.sample(sample(5))
    assert [r["dropped"] for r in reports][1:] == [{"sample": 4}], "then one per 10 s"
    await q.sample(sample(6))
    q.report_overflow()  # the daemon, before daemon_stop
    assert [r["dropped"] for r in reports][2:] == [{"sample": 1}]
    assert reports[-1]["dropped_total"] == 6
    q.report_overflow()
    assert len(reports) == 3, "nothing new: no report"


def reader_sample(n: int) -> ApplicatorSample:
    return ApplicatorSample(
        device=f"r{n}",
        reading=None,  # type: ignore[arg-type]
        delivery_id=None,
        displacement_from_beam_on_mm=None,
        peak_displacement_mm=None,
    )


class GatedWithReader(Gated):
    async def applicator(self, sample: ApplicatorSample) -> None:
        await self._call("applicator", sample.device)


async def test_applicator_samples_are_forwarded_in_order_and_dropped_like_samples() -> None:
    inner = GatedWithReader()
    async with running(QueuedSink(inner)) as q:
        await q.sample(sample(1))
        await q.applicator(reader_sample(1))
        await q.notice("info", "n1")
        await inner.until(3)
    assert inner.calls == [("sample", "d1"), ("applicator", "r1"), ("notice", "n1")]

    inner = GatedWithReader()
    inner.gate.clear()
    q = QueuedSink(inner, queue_size=2)
    async with running(q):
        await q.notice("info", "n0")  # taken by the sink's task, which waits at the gate
        await inner.entered.wait()
        await q.applicator(reader_sample(1))
        await q.notice("info", "n1")  # the queue is full now
        await q.notice("info", "n2")  # the reader's sample goes, the notices stay
        assert q.dropped_total == 1
        inner.gate.set()
        await inner.until(3)
    assert [c[1] for c in inner.calls] == ["n0", "n1", "n2"]


async def test_a_sink_that_ignores_applicator_samples_sees_only_the_rest() -> None:
    inner = Gated()  # the base class's applicator() is a no-op
    async with running(QueuedSink(inner)) as q:
        await q.applicator(reader_sample(1))
        await q.sample(sample(1))
        await inner.until(1)
    assert inner.calls == [("sample", "d1")]
    assert q.dropped_total == 0
