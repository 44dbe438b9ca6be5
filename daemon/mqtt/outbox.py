"""The MQTT outbox: store-and-forward with per-topic sequence numbers, the disk off the
live path.

Why: the broker is a sink, never the record, and it can be away (restart, network, a
crashed daemon). A subscriber must still end with every ``events``, ``telemetry`` and
``applicator`` message, in order, or a declared skip in its place, and a ``seq`` must
never be seen with two contents, also across restarts and power loss. And the live
stream must not wait for the disk (issue 21: an fsync before each sample put every other
writer on the disk on the physicist's screen).

How:

* Every message gets its ``seq`` here (:meth:`Outbox.next_seq`). A seq may be published
  only once no later run can use it for other content (:meth:`Outbox.publishable`):
  - samples (``telemetry``, ``applicator``) and the state topics go out **from memory**,
    within a **block** of their topic's seqs made durable ahead of use: ``reserved`` in
    ``state.json``, one atomic save (fsync) per RESERVE_BLOCK seqs, asked for when less
    than half a block is left, so that no sample waits for it after the first of a run;
  - ``events`` and ``skip`` go out only once **journaled** (written and fsync'd): events
    are already in the audit log by then (log-first), and a crash can never lose one a
    subscriber missed.
* Stream records are journaled for replay (JSON Lines segments, ``outbox-<n>.jsonl``) in
  group commits off the publishing path: a worker thread, samples at most every
  COMMIT_INTERVAL_S, events at once. They stay *pending* until the broker acknowledges
  them (QoS 1); ``acked_through`` -- the longest acknowledged prefix -- is kept in
  ``state.json`` with the session counter, each topic's ``next_seq`` (one past its highest
  journaled seq) and ``reserved``; a segment is deleted once everything in it is
  acknowledged and it has been held ``retention_s`` (``[mqtt] replay_retention_s``: what
  a replay request is served from, :meth:`Outbox.held`, daemon/mqtt/held.py). A sample
  the broker acknowledged before its commit is journaled all the same (``next_seq`` then
  covers it; its ``n`` is at or below ``acked_through``, so a
  recovery does not replay it, or replays it once if the state was not saved since:
  the same bytes, a repeat consumers drop). After a restart, pending messages from the
  previous run are replayed with their original ``session`` and ``seq`` (marked
  ``historical`` by the publisher): the bytes published live but for that flag, so a
  consumer that drops a repeated (``session``, ``seq``) misses nothing and sees nothing twice.
* After a crash or power loss, a sample published from memory in the last group commit
  and not acknowledged is not in the journal and cannot be replayed. The next run starts
  each topic at the previous run's ``reserved`` (never below: nothing it publishes can
  reuse a seq anyone saw) and declares the previous run's seqs from the journal's end to
  ``reserved - 1`` on the ``skip`` topic (reason ``unpublished``): what a subscriber has
  of that range is genuine, what it lacks is accounted for, never a silent gap. The skips
  are journaled before the new session is saved (a crash in between declares them
  again). A clean stop shrinks the blocks to what was handed out: nothing to declare.
  The argument in full: docs/mqtt-topics.md, "Declared skips".
* State messages (retained topics) are not queued and not journaled: only the latest
  matters, and its seq is durable by its block.
* Bounded: when pending bytes exceed ``max_bytes``, the oldest samples (``telemetry``
  and ``applicator``, each topic on its own) are thinned (every second one, oldest first,
  until below 3/4 of the bound) and the journal is compacted. Events are never dropped;
  the audit log keeps every sample regardless.
* A disk that cannot be written (full): the journal and the blocks go on in memory, said
  once, critical (``mqtt_outbox_write_failed``): a live view rather than a frozen one; a
  crash before the disk recovers may then reuse seqs under the next session.

The files (the journal's lines, ``state.json``, recovery) are daemon/mqtt/journal.py.
Layout, inside the audit log's directory (and so under its LOCK)::

    mqtt-outbox/state.json               session, next_seq, reserved, acked_through
    mqtt-outbox/outbox-<n:016d>.jsonl    {"n": n, "t": topic, "r": retained, "p": payload}
    mqtt-outbox/quarantine/              unreadable segments set aside, never deleted
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from iortd.daemon.mqtt.held import held, retired
from iortd.daemon.mqtt.journal import (
    JOURNAL_FIRST,
    RESERVE_BLOCK,
    STATE_FILE,
    OutboxError,
    Record,
    Recovered,
    Segment,
    journal_line,
    recover,
    save_state,
)
from iortd.daemon.mqtt.payloads import SEQ_MAX, TOPICS, Envelope, Payload, skip_payload
from iortd.kernel.durable import fsync_dir, write_all, write_atomic
from iortd.kernel.timefmt import utc_ts

__all__ = ["JOURNAL_FIRST", "RESERVE_BLOCK", "STREAM_TOPICS", "Outbox", "OutboxError", "Record"]

log = structlog.get_logger("iortd.mqtt")

STREAM_TOPICS = frozenset(t for t, spec in TOPICS.items() if not spec.retain)
# The sample streams: under the bound, every second one of each is dropped, oldest first;
# events never are.
THINNED_TOPICS = ("telemetry", "applicator")
# Persist acked_through at most this often while publishing (a crash re-sends at most
# this much, which consumers drop as repeats).
STATE_SAVE_INTERVAL_S = 1.0
# Samples are journaled in groups at most this often (events at once): the journal is for
# replay only, off the publishing path.
COMMIT_INTERVAL_S = 0.02


async def _uncancellable(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn`` in a worker thread to the end even if the caller is cancelled: a thread
    cannot be stopped, and a second writer must never start while it runs (the caller's
    cancellation is delivered once it is done)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError as exc:
            cancelled = exc  # however often: the thread runs on, so the caller waits
        except Exception:  # noqa: S110 - the result is taken below
            pass
    if cancelled is not None:
        raise cancelled
    fut.result()


class Outbox:
    """Build with :meth:`open`; run :meth:`run` as a task; :meth:`close` at the end.

    Not thread-safe: all methods are called from the event loop; disk work happens in a
    worker thread inside :meth:`run` (one batch at a time).
    """

    def __init__(self, directory: Path, max_bytes: int, rec: Recovered) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.session = rec.session
        self._next_seq = rec.next_seq
        # Seqs below this are covered by a saved state (or the journal): publishable. Empty
        # until a topic's first use asks for its block.
        self._reserved = dict(rec.next_seq)
        self._reserve: set[str] = set()  # the topics that want a block
        # Per topic, one past the highest seq journaled: state.json's next_seq, from which
        # a recovery declares what it cannot replay.
        self._journaled_next = dict(rec.next_seq)
        self._next_n = rec.next_n
        self.acked_through = rec.acked_through
        self._saved_acked = rec.acked_through
        self._segments = rec.segments
        self.retention_s, self._compact_acked = 0.0, -1  # acknowledged ones held (open())
        self._run_n = rec.next_n  # a run never appends to a segment of an earlier run
        self._segment_max = max(64 * 1024, min(16 * 1024 * 1024, max_bytes // 8))
        self.pending: deque[Record] = deque(rec.pending)
        self.pending_bytes = sum(len(r.line) for r in self.pending)
        self._io = asyncio.Lock()  # one disk batch at a time
        self._unjournaled: list[Record] = []
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # an event to journal or a seq beyond the block
        self._last_commit = 0.0
        self._progress = asyncio.Event()  # a batch journaled or a block saved
        # Records became publishable: wakes the publisher (the MQTT sink shares its own event).
        self.changed = asyncio.Event()
        self._compact = False
        self._thin_again_at = 0  # when thinning could not get below the bound: retry later
        self._closing = False
        self._last_save = time.monotonic()
        self.thinned = 0
        self.degraded: str | None = None  # why the journal cannot be written, if so
        self.recovered = len(self.pending)
        if rec.quarantined:
            # Records kept from a segment set aside have no live copy on disk: write them
            # into a fresh segment at once.
            self._compact = True
            self._wake.set()

    @classmethod
    async def open(cls, directory: Path, max_bytes: int, *, retention_s: float = 0.0) -> Outbox:
        """Recover the outbox and start a new session (persisted before anything is sent)."""
        try:
            rec = await asyncio.to_thread(recover, directory)
        except OSError as exc:
            raise OutboxError(f"{directory}: {exc.strerror or exc}") from None
        for problem in rec.problems:
            log.error("mqtt_outbox_damaged", problem=problem)
        self = cls(directory, max_bytes, rec)
        self.retention_s = retention_s
        ts = utc_ts(datetime.now(UTC))
        for topic, session, first, last in rec.skips:
            env = Envelope(self.next_seq("skip"), self.session, ts)
            payload = skip_payload(
                env, of_topic=topic, of_session=session, first=first, last=last,
                reason="unpublished",
            )  # fmt: skip
            self.add("skip", payload)
            log.warning(
                "mqtt_seq_skip_declared",
                topic=topic, session=session, first=first, last=last, reason="unpublished",
            )  # fmt: skip
        try:
            # The skips are on disk before the state forgets the reservation they declare
            # (a crash in between declares it again, under the next session).
            if self._unjournaled:
                batch, self._unjournaled = self._unjournaled, []
                await asyncio.to_thread(self._write, batch, None, b"")
                self._journaled_batch(batch)
            state = self._state_bytes(self.acked_through)
            await asyncio.to_thread(save_state, directory, state)
        except OSError as exc:
            raise OutboxError(f"{directory / STATE_FILE}: {exc.strerror or exc}") from None
        if self.pending:
            log.info(
                "mqtt_outbox_recovered",
                pending=len(self.pending),
                sessions=sorted({r.session for r in self.pending}),
            )
        return self

    # ---- making records ----------------------------------------------------------------

    def next_seq(self, topic: str) -> int:
        """Allocate the next ``seq`` of ``topic``. Publishable once durable: inside a saved
        block of its topic, or (``events``, ``skip``) once its record is journaled."""
        seq = self._next_seq[topic]
        if seq >= SEQ_MAX:  # the counter itself must stay a 64-bit value
            raise OverflowError(f"seq of {topic} exhausted")
        self._next_seq[topic] = seq + 1
        if topic not in JOURNAL_FIRST and seq + RESERVE_BLOCK // 2 >= self._reserved[topic]:
            self._reserve.add(topic)
            if seq >= self._reserved[topic]:
                self._urgent.set()  # it waits for the block: no commit interval
            self._wake.set()
        return seq

    def add(self, topic: str, payload: Payload) -> Record:
        """Queue a message (its payload already holds the ``seq`` from :meth:`next_seq`).
        Stream messages stay pending until acknowledged; a state message is the caller's
        to publish once publishable (:meth:`wait_publishable`) and to :meth:`ack`. Only
        stream records are journaled: a state message is never replayed, and its ``seq``
        is durable by its block."""
        retained = topic not in STREAM_TOPICS
        n = self._next_n
        self._next_n += 1
        line, at = journal_line(n, topic, retained, orjson.dumps(payload))
        seq, session = payload["seq"], payload["session"]
        rec = Record(n, topic, retained, seq, session, line, at, time.monotonic_ns())
        if not retained:
            self._unjournaled.append(rec)
            if topic in JOURNAL_FIRST:
                self._urgent.set()
            self.pending.append(rec)
            self.pending_bytes += len(rec.line)
            if self.pending_bytes > max(self.max_bytes, self._thin_again_at):
                self._thin()
        self._wake.set()
        return rec

    def publishable(self, rec: Record) -> bool:
        """Whether ``rec`` may go out: a subscriber may see its ``seq`` only once no later
        run can use it for other content (module docstring)."""
        if rec.topic in JOURNAL_FIRST or rec.created_ns < 0:
            return rec.journaled
        return rec.seq < self._reserved[rec.topic]

    async def wait_journaled(self, rec: Record) -> None:
        while not rec.journaled:
            self._progress.clear()
            await self._progress.wait()

    async def wait_publishable(self, rec: Record) -> None:
        while not self.publishable(rec):
            self._progress.clear()
            await self._progress.wait()

    def unsent(self) -> Iterator[Record]:
        """Pending stream records that are publishable, in order within each topic (a
        sample never waits behind an event's journal commit)."""
        for rec in self.pending:
            if not rec.done and self.publishable(rec):
                yield rec

    async def held(self, topic: str, session: int, first: int, last: int) -> list[Record]:
        """``topic``'s records of ``session``, ``first <= seq <= last``, held or pending."""
        return await held(self._segments, self.pending, Record, (topic, session, first, last))

    def ack(self, rec: Record) -> None:
        """The broker has it (or refused it for good): nothing left to send."""
        if not rec.done:
            rec.done = True
            if not rec.retained:
                self.pending_bytes -= len(rec.line)
                self._settle()

    def _settle(self) -> None:
        """Drop the done prefix; ``acked_through`` is the last ``n`` before the first
        stream record still to send (state records are never replayed, so they do not
        hold it back)."""
        while self.pending and self.pending[0].done:
            self.pending.popleft()
        self.acked_through = (self.pending[0].n if self.pending else self._next_n) - 1
        self._wake.set()

    def _thin(self) -> None:
        """Oldest samples first (``telemetry`` and ``applicator``), every second one of
        each topic, until below 3/4 of the bound."""
        low = self.max_bytes * 3 // 4
        dropped: list[int] = []
        by_topic: dict[str, list[int]] = {t: [] for t in THINNED_TOPICS}
        ranges: dict[tuple[str, int], tuple[int, int]] = {}  # (topic, session) -> seqs
        while self.pending_bytes > low:
            before = len(dropped)
            # Alternate per topic: one alternation over interleaved streams would drop
            # one of them whole.
            skip = dict.fromkeys(THINNED_TOPICS, True)
            for rec in self.pending:
                if self.pending_bytes <= low:
                    break
                if rec.done or rec.topic not in skip or not rec.journaled:
                    continue
                skip[rec.topic] = not skip[rec.topic]
                if not skip[rec.topic]:
                    rec.done = True
                    self.pending_bytes -= len(rec.line)
                    dropped.append(rec.seq)
                    by_topic[rec.topic].append(rec.seq)
                    lo, hi = ranges.get((rec.topic, rec.session), (rec.seq, rec.seq))
                    ranges[(rec.topic, rec.session)] = (min(lo, rec.seq), max(hi, rec.seq))
            if len(dropped) == before:
                break  # only events (and samples not yet on disk) left: never dropped
        # Events (never dropped) may hold the outbox above its bound: do not walk it all
        # again at every add, only after another 1/16 of the bound.
        over = self.pending_bytes > low
        self._thin_again_at = self.pending_bytes + self.max_bytes // 16 if over else 0
        if not dropped:
            return
        self.pending = deque(r for r in self.pending if not r.done)
        self._settle()
        self.thinned += len(dropped)
        # Declared, each topic and session one range: queued behind the samples of the
        # range that were kept, so a consumer has them before it reads the declaration.
        ts = utc_ts(datetime.now(UTC))
        for (topic, session), (first, last) in ranges.items():
            env = Envelope(self.next_seq("skip"), self.session, ts)
            self.add(
                "skip",
                skip_payload(
                    env, of_topic=topic, of_session=session, first=first, last=last,
                    reason="thinned",
                ),
            )  # fmt: skip
        self._compact = True  # free the bytes on disk too
        log.warning(
            "mqtt_outbox_thinned",
            dropped_samples=len(dropped),
            telemetry_seq_first=min(by_topic["telemetry"], default=None),
            telemetry_seq_last=max(by_topic["telemetry"], default=None),
            applicator_samples=len(by_topic["applicator"]),
            applicator_seq_first=min(by_topic["applicator"], default=None),
            applicator_seq_last=max(by_topic["applicator"], default=None),
            pending_bytes=self.pending_bytes,
            max_bytes=self.max_bytes,
        )

    # ---- the journal -------------------------------------------------------------------

    async def run(self) -> None:
        """Save the next block of seqs ahead of use, journal new records in groups (write +
        fsync in a thread; samples at most every COMMIT_INTERVAL_S, events at once), delete
        segments that are fully acknowledged, and save the state now and then. Ends at
        close."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = self._last_commit + COMMIT_INTERVAL_S - time.monotonic()
            if wait > 0 and not (self._closing or self._urgent.is_set()):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._urgent.wait()
            self._urgent.clear()
            await self._flush()
            self._last_commit = time.monotonic()
            if self._closing and not self._unjournaled:
                return

    async def _flush(self) -> None:
        async with self._io:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        if self._reserve:
            await self._reserve_block()
        batch, self._unjournaled = self._unjournaled, []
        # Everything the thread reads is taken here, on the loop: the loop goes on adding
        # and acknowledging while the thread writes.
        live: list[Record] | None = None
        if self._compact:
            self._compact = False
            live = [r for r in self.pending if not r.done and r.journaled]
            self._compact_acked = self.acked_through  # what the thread keeps held
        if batch or live is not None:
            state = self._state_bytes(self.acked_through)
            try:
                await _uncancellable(self._write, batch, live, state)
            except OSError as exc:
                # The journal cannot be written: publish from memory rather than freeze
                # the live view (the audit log is the record). Said once, loudly.
                if self.degraded is None:
                    log.critical("mqtt_outbox_write_failed", error=str(exc))
                self.degraded = str(exc)
            else:
                if self.degraded is not None:
                    log.warning("mqtt_outbox_writable_again")
                    self._compact = True  # what went out unjournaled is written now
                    self._wake.set()
                self.degraded = None
            finally:
                if self.degraded is None:
                    self._journaled_batch(batch)
                for rec in batch:
                    rec.journaled = True  # or, degraded, published from memory
                self._progress.set()
                self.changed.set()
        due = time.monotonic() - self._last_save >= STATE_SAVE_INTERVAL_S
        if self.acked_through != self._saved_acked and (due or self._closing):
            with contextlib.suppress(OSError):
                acked = self.acked_through
                await _uncancellable(self._retire, acked, self._state_bytes(acked))

    def _journaled_batch(self, batch: list[Record]) -> None:
        for rec in batch:
            rec.journaled = True
            if rec.seq >= self._journaled_next[rec.topic]:
                self._journaled_next[rec.topic] = rec.seq + 1

    async def _reserve_block(self) -> None:
        """Save a new block for every topic with less than half a block left. Until it is
        saved, no seq beyond the last saved block goes out. If the state cannot be saved
        (a full disk), the block is taken anyway, as the journal's degraded mode does:
        said loudly, and the exception documented (docs/mqtt-topics.md)."""
        topics, self._reserve = self._reserve, set()
        want = dict(self._reserved)
        for t in topics:
            want[t] = min(SEQ_MAX, max(want[t], self._next_seq[t] + RESERVE_BLOCK))
        try:
            state = self._state_bytes(self.acked_through, want)
            await _uncancellable(save_state, self.directory, state)
        except OSError as exc:
            if self.degraded is None:
                log.critical("mqtt_outbox_write_failed", error=str(exc))
            self.degraded = str(exc)
        for t, bound in want.items():
            self._reserved[t] = max(self._reserved[t], bound)
        self._progress.set()
        self.changed.set()

    def _write(self, batch: list[Record], live: list[Record] | None, state: bytes) -> None:
        if live is not None:
            self._compact_now(live, state)
        if not batch:
            return
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.size >= self._segment_max or seg.last_n < self._run_n:
            path = self.directory / f"outbox-{batch[0].n:016d}.jsonl"
            seg = Segment(path, batch[0].n, batch[0].n, 0)
            self._segments.append(seg)
            new = True
        else:
            new = False
        data = b"".join(r.line for r in batch)
        fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        except OSError:
            # Never leave a partial line for the next batch to be appended to (it would
            # garble a good record too): cut back to what was there.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, seg.size)
            raise
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.directory)
        seg.size += len(data)
        seg.last_n = batch[-1].n

    def _compact_now(self, live: list[Record], state: bytes) -> None:
        """Rewrite what is still pending into one segment and delete the others (but the
        acknowledged ones held for replays; a mixed one goes whole). Crash-safe:
        the state (every ``seq`` handed out) is saved first, since the segments about to go
        may hold the highest ones; the new segment is complete and renamed before any old
        one goes; recovery takes each ``n`` once."""
        save_state(self.directory, state)
        old = list(self._segments)
        keep_held = self.retention_s > 0
        self._segments = [s for s in old if keep_held and s.last_n <= self._compact_acked]
        if live:
            path = self.directory / f"outbox-{live[0].n:016d}.jsonl"
            write_atomic(path, b"".join(r.line for r in live))
            self._segments.append(Segment(path, live[0].n, live[-1].n, path.stat().st_size))
        keep = {s.path for s in self._segments}
        for seg in old:
            if seg.path not in keep:
                seg.path.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def _retire(self, acked: int, state: bytes) -> None:
        """Save the state, then delete segments that hold nothing unacknowledged (the
        current one too: the next batch starts a fresh segment) once held
        ``retention_s``, or beyond ``max_bytes`` of them, oldest first."""
        save_state(self.directory, state)
        self._saved_acked = acked
        self._last_save = time.monotonic()
        for _ in range(retired(self._segments, acked, self.retention_s, self.max_bytes)):
            self._segments.pop(0).path.unlink(missing_ok=True)

    def _state_bytes(self, acked: int, reserved: dict[str, int] | None = None) -> bytes:
        """``next_seq``: one past each topic's highest journaled seq (and, for a state
        topic, never journaled, the seqs handed out); ``reserved``: each topic's saved
        block (a new run starts there and declares what it cannot replay below it)."""
        next_seq = {
            t: self._journaled_next[t] if t in STREAM_TOPICS else nxt
            for t, nxt in self._next_seq.items()
        }
        state = {
            "session": self.session,
            "next_n": self._next_n,
            "acked_through": acked,
            "next_seq": next_seq,
            "reserved": dict(self._reserved if reserved is None else reserved),
        }
        return orjson.dumps(state, option=orjson.OPT_INDENT_2)

    async def close(self) -> None:
        """Journal what is left, save the state. Pending records stay for the next run.
        The blocks shrink to the seqs handed out: after a clean stop, the next run
        continues without a hole (what could not be journaled is declared, as after a
        crash)."""
        self._closing = True
        self._wake.set()
        async with self._io:
            await self._flush_locked()
            try:
                acked = self.acked_through
                state = self._state_bytes(acked, dict(self._next_seq))
                await _uncancellable(self._retire, acked, state)
            except OSError as exc:
                log.error("mqtt_outbox_state_not_saved", error=str(exc))  # noqa: TRY400
