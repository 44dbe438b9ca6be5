"""The queued adapter: each sink behind its own bounded queue and task.

Why: the daemon's dispatcher tells every sink, in order, once what it is told is in the
audit log. Awaited one after another, a slow sink (a database across a VPN, a display
that blocks) delayed every sink after it. Behind a :class:`QueuedSink`, a callback from
the dispatcher only puts the call in the sink's queue; the sink's own task takes the
calls out, in order, one at a time, each bounded by ``timeout_s``. So each sink runs at
its own pace; the record is never delayed by any of them (it is written before the
dispatcher hears of anything), and neither is the poll loop (it never waits for the
dispatcher).

The queue is bounded (``queue_size`` calls). When it is full, the sink's ``overflow``
policy decides:

* ``drop_oldest`` (the default): room is made at once. The oldest queued *sample* goes
  (a newer reading supersedes it); if none is queued and the newcomer is a sample, the
  newcomer goes; only a queue holding no sample at all loses its oldest event, checkpoint
  or notice. Nothing ever waits.
* ``block``: the dispatcher waits for room, at most ``timeout_s``; **every sink after it
  waits too** (the record and the poll loop do not). For sinks that must see everything
  and are fast, like the MQTT sink (its callbacks only hand payloads to its outbox, which
  has its own bound and thinning: docs/mqtt-topics.md). When the wait times out the sink
  counts as stalled: its calls are dropped as under ``drop_oldest``, without waiting,
  until its queue has drained to half, so that a sink that has stopped cannot hold the
  others up for ``timeout_s`` per reading.

Every drop is counted by kind (``sample``, ``events``, ...), logged (``sink_overflow``:
the first drop at once, then at most one report every ``REPORT_EVERY_S``, with the counts
since the last) and handed to ``on_overflow`` with the same figures, which the daemon
records in the audit log as a ``sink_overflow`` entry (the last before ``daemon_stop``): a
sink that missed part of a delivery says so in the record.

Shutdown: :meth:`aclose` stops taking calls, lets the queue drain for at most
``drain_s``, cancels the rest (counted and logged as ``sink_drain_timeout``), then closes
the sink. A callback that raises is logged (``sink_failed``) and that call is lost; one
that overruns ``timeout_s`` is cancelled and logged (``sink_timeout``). Neither stops the
sink's task, the daemon, or any other sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from iortd.daemon.sinks import ApplicatorSample, Overflow, Sample, Sink
from iortd.daemon.tracker import DeliverySnapshot, TrackerEvent
from iortd.kernel.types import DeviceIdentity

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_TIMEOUT_S",
    "DRAIN_S",
    "REPORT_EVERY_S",
    "QueuedSink",
    "SinkLike",
    "queued",
]

log = structlog.get_logger("iortd.sinks")

DEFAULT_QUEUE_SIZE = 1000  # about 100 s of readings at 10 Hz
DEFAULT_TIMEOUT_S = 10.0
DRAIN_S = 2.0  # within the daemon's per-sink close bound (5 s), before the sink's own close
REPORT_EVERY_S = 10.0


class SinkLike(Protocol):
    """What the daemon calls on a sink: :class:`iortd.daemon.sinks.Sink` or any object
    with the same methods (tests pass plain ones)."""

    name: str

    async def run(self) -> None: ...
    async def started(self, device: str, identity: DeviceIdentity) -> None: ...
    async def sample(self, sample: Sample) -> None: ...
    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None: ...
    async def checkpoint(self, note: str) -> None: ...
    async def notice(self, severity: str, message: str) -> None: ...
    async def aclose(self) -> None: ...


_Call = tuple[str, tuple[Any, ...]]  # (callback name, its arguments)
# What goes first when a queue is full: the next reading supersedes a dropped one.
_SAMPLES = frozenset({"sample", "applicator"})


class QueuedSink(Sink):
    """``inner`` behind a bounded queue and a task of its own (see the module notes)."""

    def __init__(
        self,
        inner: SinkLike,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        overflow: Overflow = "drop_oldest",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        block_s: float | None = None,
        drain_s: float = DRAIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.inner = inner
        self.name = inner.name
        self.queue_size = queue_size
        self.overflow: Overflow = overflow
        self.timeout_s = timeout_s
        # How long ``block`` waits for room: ``timeout_s`` (a hung callback is cut then,
        # which makes room) unless a test says otherwise.
        self.block_s = timeout_s if block_s is None else block_s
        self.drain_s = drain_s
        self._clock = clock
        self._queue: deque[_Call] = deque()
        self._ready = asyncio.Event()  # the queue has a call, or the sink is closing
        self._room = asyncio.Event()  # a call was taken out
        self._stalled = False  # ``block`` timed out: drop without waiting until half empty
        self._closing = False
        self._closed = False
        self._consumer: asyncio.Task[None] | None = None
        self._busy = False  # a callback is running
        # Set by the daemon: records a drop report in the audit log. Must not block.
        self.on_overflow: Callable[[Mapping[str, Any]], None] | None = None
        self.dropped_total = 0
        self._unreported: Counter[str] = Counter()
        self._last_report = -REPORT_EVERY_S

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def pending(self) -> int:
        """Calls queued or running."""
        return len(self._queue) + self._busy

    # ---- the daemon's side: enqueue ----------------------------------------------------

    async def started(self, device: str, identity: DeviceIdentity) -> None:
        await self._put(("started", (device, identity)))

    async def sample(self, sample: Sample) -> None:
        await self._put(("sample", (sample,)))

    async def applicator(self, sample: ApplicatorSample) -> None:
        if hasattr(self.inner, "applicator"):  # a plain test sink may not have it
            await self._put(("applicator", (sample,)))

    async def events(
        self, events: Sequence[TrackerEvent], delivery: DeliverySnapshot | None
    ) -> None:
        await self._put(("events", (events, delivery)))

    async def checkpoint(self, note: str) -> None:
        await self._put(("checkpoint", (note,)))

    async def notice(self, severity: str, message: str) -> None:
        await self._put(("notice", (severity, message)))

    async def signed(self, delivery_id: str, meaning: str) -> None:
        if hasattr(self.inner, "signed"):  # a plain test sink may not have it
            await self._put(("signed", (delivery_id, meaning)))

    async def report(self, kind: str, data: Mapping[str, Any]) -> None:
        if hasattr(self.inner, "report"):
            await self._put(("report", (kind, data)))

    async def _put(self, call: _Call) -> None:
        if self._closing:
            self._drop(call[0], why="closed")
            return
        if len(self._queue) >= self.queue_size and self.overflow == "block" and not self._stalled:
            try:
                async with asyncio.timeout(self.block_s):
                    while len(self._queue) >= self.queue_size and not self._closing:
                        self._room.clear()
                        await self._room.wait()
            except TimeoutError:
                self._stalled = True
                log.error(  # noqa: TRY400 - expected, not a crash: no traceback
                    "sink_stalled",
                    sink=self.name,
                    waited_s=self.block_s,
                    queued=len(self._queue),
                    why="no room within timeout_s: dropping until its queue is half empty",
                )
            if self.closing:  # closed while waiting
                self._drop(call[0], why="closed")
                return
        if len(self._queue) >= self.queue_size:
            victim = self._make_room(call)
            self._drop(victim or call[0], why="queue full")
            if victim is None:
                return  # the newcomer was the one to go
        self._queue.append(call)
        self._ready.set()

    def _make_room(self, call: _Call) -> str | None:
        """Remove one queued call (see the module notes) and return its kind; None when
        the newcomer is the one to go."""
        for i, (kind, _) in enumerate(self._queue):
            if kind in _SAMPLES:
                del self._queue[i]
                return kind
        if call[0] in _SAMPLES:
            return None
        kind, _ = self._queue.popleft()
        return kind

    def _drop(self, kind: str, *, why: str) -> None:
        self.dropped_total += 1
        self._unreported[kind] += 1
        if self._clock() - self._last_report >= REPORT_EVERY_S:
            self.report_overflow(why=why)

    def report_overflow(self, *, why: str = "queue full") -> None:
        """Log and hand over the drops not yet reported (the daemon calls this before its
        ``daemon_stop`` entry, so that the record accounts for every drop of the run)."""
        if not self._unreported:
            return
        data = {
            "sink": self.name,
            "policy": self.overflow,
            "queue_size": self.queue_size,
            "why": why,
            "dropped": dict(sorted(self._unreported.items())),
            "dropped_total": self.dropped_total,
        }
        self._unreported.clear()
        self._last_report = self._clock()
        log.warning("sink_overflow", **data)
        if self.on_overflow is not None:
            try:
                self.on_overflow(data)
            except Exception:
                log.exception("sink_overflow_not_recorded", sink=self.name)

    # ---- the sink's side: its own task ----------------------------------------------------

    async def run(self) -> None:
        """The sink's work and its queue's consumer, until :meth:`aclose`. Never raises
        (but cancellation)."""
        if self._closed:
            return  # closed before it ran (a start that failed further on)
        async with asyncio.TaskGroup() as tg:
            self._consumer = tg.create_task(self._consume(), name=f"sink-queue:{self.name}")
            tg.create_task(self._inner_run(), name=f"sink:{self.name}")

    async def _inner_run(self) -> None:
        try:
            await self.inner.run()
        except Exception:
            # A sink's own work failing must not take the daemon (and its record) down.
            log.exception("sink_failed", sink=self.name, callback="run")

    async def _consume(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._ready.clear()
                await self._ready.wait()
            kind, args = self._queue.popleft()
            self._busy = True
            self._room.set()
            if self._stalled and len(self._queue) <= self.queue_size // 2:
                self._stalled = False
                log.info("sink_caught_up", sink=self.name, queued=len(self._queue))
            try:
                async with asyncio.timeout(self.timeout_s):
                    await getattr(self.inner, kind)(*args)
            except TimeoutError:
                log.error(  # noqa: TRY400 - expected, not a crash: no traceback
                    "sink_timeout", sink=self.name, callback=kind, timeout_s=self.timeout_s
                )
            except Exception:
                log.exception("sink_failed", sink=self.name, callback=kind)
            finally:
                self._busy = False

    async def aclose(self) -> None:
        """Stop taking calls, drain within ``drain_s``, then close the sink."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._ready.set()
        self._room.set()
        consumer = self._consumer
        if consumer is not None and not consumer.done():
            done, _ = await asyncio.wait({consumer}, timeout=self.drain_s)
            if not done:
                log.error(
                    "sink_drain_timeout",
                    sink=self.name,
                    drain_s=self.drain_s,
                    not_delivered=self.pending,
                )
                consumer.cancel(msg="sink queue: drain timed out")
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
        self.report_overflow(why="closed")
        try:
            await self.inner.aclose()
        except Exception:
            # A sink that fails to close must not stop the others, or the audit log's close.
            log.exception("sink_failed", sink=self.name, callback="aclose")


def queued(sink: SinkLike | QueuedSink) -> QueuedSink:
    """``sink`` behind a queue of its own: its class's ``queue_size``, ``overflow`` and
    ``timeout_s`` when it says (the MQTT sink does), else the defaults. A sink already
    queued (built from ``[[sinks]]``, with the table's settings) is returned as is."""
    if isinstance(sink, QueuedSink):
        return sink
    return QueuedSink(
        sink,
        queue_size=getattr(sink, "queue_size", DEFAULT_QUEUE_SIZE),
        overflow=getattr(sink, "overflow", "drop_oldest"),
        timeout_s=getattr(sink, "timeout_s", DEFAULT_TIMEOUT_S),
    )
