"""A slow sink delays only itself: the record, the other sinks and the poll loop keep pace.

In-process daemon, real audit log, scripted console at 50 Hz; one sink takes a whole
second per callback (a database across a VPN, a blocked terminal). Measured: the other
sink's lag from reading to receipt, and the log's committed entries, while the slow one
has handled only a few calls; then what the slow sink's small queue dropped is in the
record, before ``daemon_stop``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from test_daemon_service import RecordingSink, scripted

from iortd.daemon.app import App
from iortd.daemon.sink_queue import QueuedSink
from iortd.daemon.sinks import Sample
from iortd.daemon.tracker import DeliverySnapshot, TrackerEvent
from iortd.kernel.clock import SystemClock

pytestmark = pytest.mark.integration

SLOW_S = 1.0


class SlowSink(RecordingSink):
    name = "slow"

    async def sample(self, sample: Sample) -> None:
        await asyncio.sleep(SLOW_S)  # deliberately slow: the point of the test
        await super().sample(sample)

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        await asyncio.sleep(SLOW_S)
        await super().events(events, delivery)


class TimedSink(RecordingSink):
    name = "timed"

    def __init__(self) -> None:
        super().__init__()
        self.lags_s: list[float] = []

    async def sample(self, sample: Sample) -> None:
        self.lags_s.append((time.monotonic_ns() - sample.reading.mono_ns) / 1e9)
        await super().sample(sample)


def entries(log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for seg in sorted(log_dir.glob("log-*.jsonl")):
        out += [json.loads(line) for line in seg.read_text().splitlines() if line]
    return out


async def test_a_slow_sink_delays_neither_the_record_nor_another_sink(tmp_path: Path) -> None:
    loaded, registry, _ = scripted(tmp_path, ["ok"] * 100_000)
    log_dir = loaded.config.log.directory
    slow, timed = SlowSink(), TimedSink()
    # The slow sink goes first: told one after another, everything behind it would wait.
    # A small queue, so that it overflows in a second; a short drain, so that the test
    # does not wait for it.
    slow_q = QueuedSink(slow, queue_size=5, drain_s=0.2)
    daemon = App(loaded, registry, SystemClock(), [slow_q, timed])
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    t0 = time.monotonic()
    await timed.wait_for(lambda: len(timed.samples) >= 50, "50 samples at the fast sink")
    took_s = time.monotonic() - t0
    committed = sum(seg.read_bytes().count(b"\n") for seg in log_dir.glob("log-*.jsonl"))
    slow_handled = len(slow.samples)
    stop.set()
    async with asyncio.timeout(20):
        await task

    # 50 readings at 50 Hz take 1 s; sequential delivery would take 50 x SLOW_S.
    assert took_s < 10 * SLOW_S, f"the fast sink needed {took_s:.1f} s for 50 samples"
    worst = max(timed.lags_s)
    assert worst < 0.5 * SLOW_S, f"the fast sink lagged {worst:.3f} s behind a reading"
    assert slow_handled <= 3, "the slow sink really was slow"
    assert committed >= 50, f"the record kept pace: {committed} entries written"
    # The slow sink's drops are in the record, counted by kind, before daemon_stop.
    kinds = [e["type"] for e in entries(log_dir)]
    assert "sink_overflow" in kinds
    assert kinds.index("sink_overflow") < kinds.index("daemon_stop")
    reports = [e["data"] for e in entries(log_dir) if e["type"] == "sink_overflow"]
    assert all(r["sink"] == "slow" and r["policy"] == "drop_oldest" for r in reports)
    recorded = sum(sum(r["dropped"].values()) for r in reports)
    assert 0 < recorded <= slow_q.dropped_total
    assert slow.closed
    assert timed.closed


class SlowToClose(RecordingSink):
    async def aclose(self) -> None:
        await asyncio.sleep(SLOW_S)  # deliberately slow: a flush to a slow server
        await super().aclose()


async def test_sinks_close_together_not_one_after_another(tmp_path: Path) -> None:
    loaded, registry, _ = scripted(tmp_path, ["ok"] * 100_000)
    sinks = [SlowToClose() for _ in range(3)]
    for i, s in enumerate(sinks):
        s.name = f"slow-close-{i}"
    daemon = App(loaded, registry, SystemClock(), sinks)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await sinks[0].wait_for(lambda: len(sinks[0].samples) >= 5, "a few samples")
    t0 = time.monotonic()
    stop.set()
    async with asyncio.timeout(20):
        await task
    took_s = time.monotonic() - t0
    assert all(s.closed for s in sinks)
    # One after another would take 3 x SLOW_S.
    assert took_s < 2.5 * SLOW_S, f"shutdown took {took_s:.2f} s"
