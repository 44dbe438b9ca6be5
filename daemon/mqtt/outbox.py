"""The MQTT outbox: on-disk store-and-forward with per-topic sequence numbers.

Why: the broker is a sink, never the record, and it can be away (restart, network, a
crashed daemon). A subscriber must still end with every ``events``, ``telemetry`` and
``applicator`` message, in order, none missing, and ``seq`` must never repeat, also
across restarts.

How:

* Every message gets its ``seq`` here, and is written to a journal (JSON Lines segments,
  ``outbox-<n>.jsonl``) and fsync'd **before** it is published. A ``seq`` the broker has
  seen is therefore always on disk, and after any crash the next one is larger. Writes and
  fsyncs run in a worker thread in groups, never on the event loop.
* Stream messages (``telemetry``, ``applicator``, ``events``) stay *pending* until the
  broker acknowledges them (QoS 1). ``acked_through`` -- the longest acknowledged prefix
  -- is kept in ``state.json`` with the session counter and the next ``seq`` of every
  topic; a segment goes once all in it is acknowledged and held ``retention_s`` (replays:
  held.py). After a restart, pending messages from the previous run are replayed with
  their original ``session`` and ``seq`` (marked ``historical`` by the publisher), so a
  consumer that drops a repeated (``session``, ``seq``) misses nothing and sees nothing twice.
* State messages (retained topics) are not queued: only the latest matters. They get a
  ``seq`` when they are published and are journaled only so that the ``seq`` is durable.
* Bounded: when pending bytes exceed ``max_bytes``, the oldest samples (``telemetry``
  and ``applicator``, each topic on its own) are thinned (every second one, oldest first,
  until below 3/4 of the bound) and the journal is compacted. Events are never dropped;
  the audit log keeps every sample regardless.

Layout, inside the audit log's directory (and so under its LOCK)::

    mqtt-outbox/state.json               session, next seq per topic, acked_through
    mqtt-outbox/outbox-<n:016d>.jsonl    {"n": n, "t": topic, "r": retained, "p": payload}
    mqtt-outbox/quarantine/              unreadable segments set aside, never deleted
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from iortd.daemon.mqtt.held import held, retired
from iortd.daemon.mqtt.payloads import SEQ_MAX, TOPICS, Payload
from iortd.kernel.durable import fsync_dir, write_all, write_atomic

__all__ = ["STREAM_TOPICS", "Outbox", "OutboxError", "Record"]

log = structlog.get_logger("iortd.mqtt")

STREAM_TOPICS = frozenset(t for t, spec in TOPICS.items() if not spec.retain)
# The sample streams: under the bound, every second one of each is dropped, oldest first;
# events never are.
THINNED_TOPICS = ("telemetry", "applicator")
STATE_FILE = "state.json"
PREV_STATE_FILE = "state.copy.json"
SEGMENT_RE = re.compile(r"^outbox-(\d{16})\.jsonl$")
# Persist acked_through at most this often while publishing (a crash re-sends at most
# this much, which consumers drop as repeats).
STATE_SAVE_INTERVAL_S = 1.0


class OutboxError(Exception):
    """The outbox directory cannot be used (names the file and what is wrong)."""


@dataclass(slots=True)
class Record:
    """One message, kept as its journal line only (memory is what the bound counts: a
    parsed payload would cost several times the bytes). ``created_ns`` is this process's
    monotonic clock at creation, -1 for a record recovered from disk."""

    n: int
    topic: str
    retained: bool
    seq: int
    session: int
    line: bytes  # {"n":..,"t":..,"r":..,"p":<body>}\n
    body_at: int  # where the payload's bytes start in ``line``
    created_ns: int
    journaled: bool = False
    done: bool = False  # acknowledged, thinned or superseded: nothing left to send

    @property
    def body(self) -> bytes:
        """The payload as published live."""
        return self.line[self.body_at : -2]

    @property
    def payload(self) -> Payload:
        payload: Payload = orjson.loads(self.body)
        return payload

    def wire(self, *, historical: bool) -> bytes:
        """The bytes to publish: the live body, or the same payload marked historical (the
        envelope's ``historical`` is the first such key in the payload)."""
        body = self.body
        if not historical:
            return body
        return body.replace(b'"historical":false', b'"historical":true', 1)


@dataclass(slots=True)
class _Segment:
    path: Path
    first_n: int
    last_n: int
    size: int
    acked_at: float | None = None  # monotonic, when seen fully acknowledged (held since)


@dataclass(slots=True)
class _Recovered:
    session: int
    next_seq: dict[str, int]
    next_n: int
    acked_through: int
    pending: list[Record] = field(default_factory=list)
    segments: list[_Segment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    quarantined: bool = False


def _save_state(directory: Path, state: bytes) -> None:
    # Two copies, each replaced atomically: if one is ever unreadable (a disk error, an
    # edit), the counters are not lost with it, and the other is just as new.
    write_atomic(directory / STATE_FILE, state)
    write_atomic(directory / PREV_STATE_FILE, state)


def _line(n: int, topic: str, retained: bool, body: bytes) -> tuple[bytes, int]:
    """The journal line around the payload's bytes as published (serialized once), and
    where those bytes start in it."""
    head = orjson.dumps({"n": n, "t": topic, "r": retained})[:-1] + b',"p":'
    return head + body + b"}\n", len(head)


def _quarantine(directory: Path, path: Path, why: str) -> str:
    q = directory / "quarantine"
    q.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = q / f"{path.name}.{stamp}"
    path.replace(target)
    return f"{path}: {why}; set aside as {target}"


def _parse_state(raw: bytes) -> dict[str, Any]:
    state = orjson.loads(raw)
    if not isinstance(state, dict):
        raise TypeError("not a JSON object")
    ints = (state["session"], state["next_n"], state["acked_through"])
    ints += tuple(state["next_seq"].values())
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in ints):
        raise TypeError("session, next_n, acked_through and next_seq must be integers")
    return state


def _read_state(directory: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The state, or its copy if the state is missing or unreadable."""
    problems = []
    for name in (STATE_FILE, PREV_STATE_FILE):
        path = directory / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        try:
            state = _parse_state(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            problems.append(_quarantine(directory, path, f"unreadable ({exc})"))
            continue
        if problems:
            problems.append(f"{path}: the copy of the state was used instead")
        return state, problems
    return None, problems


def _parse_line(raw: bytes) -> tuple[int, str, bool, Payload]:
    """One journal line -> (n, topic, retained, payload); raises ValueError/TypeError."""
    obj = orjson.loads(raw)
    n, topic, retained, payload = obj["n"], obj["t"], obj["r"], obj["p"]
    if topic not in TOPICS or not isinstance(n, int) or not isinstance(payload, dict):
        raise TypeError("not an outbox record")
    if not isinstance(payload["seq"], int) or not isinstance(payload["session"], int):
        raise TypeError("payload without integer seq and session")
    return n, topic, bool(retained), payload


def _recovered_record(n: int, topic: str, payload: Payload, raw: bytes) -> Record:
    at = raw.find(b',"p":') + 5
    if at < 5 or not raw.endswith(b"}\n"):  # not our own serialization: make it so
        raw, at = _line(n, topic, False, orjson.dumps(payload))
    return Record(n, topic, False, payload["seq"], payload["session"], raw, at, -1, journaled=True)


def _recover(directory: Path) -> _Recovered:
    """Read state.json and the journal; what was not acknowledged becomes pending."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob("*.tmp"):  # a save cut short: never renamed, not used
        leftover.unlink()
    state, problems = _read_state(directory)
    rec = _Recovered(
        session=0 if state is None else state["session"],
        next_seq=dict.fromkeys(TOPICS, 0),
        next_n=0 if state is None else state["next_n"],
        acked_through=-1 if state is None else state["acked_through"],
    )
    rec.problems += problems
    if state is not None:
        for t, v in state["next_seq"].items():
            if t in rec.next_seq:
                rec.next_seq[t] = max(rec.next_seq[t], v)
    seen: dict[int, Record] = {}
    names = sorted(p for p in directory.iterdir() if SEGMENT_RE.match(p.name))
    for i, path in enumerate(names):
        data = path.read_bytes()
        pos = 0
        first_n: int | None = None
        last_n = -1
        lineno = 0
        bad: list[str] = []
        while pos < len(data):
            lineno += 1
            nl = data.find(b"\n", pos)
            raw = data[pos:] if nl < 0 else data[pos : nl + 1]
            pos = len(data) if nl < 0 else nl + 1
            try:
                if nl < 0:
                    raise ValueError("incomplete line")  # noqa: TRY301 - handled below
                n, topic, retained, payload = _parse_line(raw)
            except (ValueError, KeyError, TypeError) as exc:
                if i == len(names) - 1 and nl < 0:
                    # A write cut short by a crash: the torn tail was never published
                    # (publishing waits for the fsync), so it is dropped.
                    with open(path, "r+b") as f:
                        f.truncate(len(data) - len(raw))
                        os.fsync(f.fileno())
                    rec.problems.append(f"{path}: line {lineno}: torn tail dropped ({exc})")
                else:
                    bad.append(f"line {lineno}: {exc}")
                continue
            first_n = n if first_n is None else first_n
            last_n = max(last_n, n)
            rec.next_seq[topic] = max(rec.next_seq[topic], payload["seq"] + 1)
            rec.session = max(rec.session, payload["session"])
            rec.next_n = max(rec.next_n, n + 1)
            if n > rec.acked_through and not retained and n not in seen:
                seen[n] = _recovered_record(n, topic, payload, raw)
        if bad:
            # A line that cannot be read may have held any topic's highest seq: skip past
            # it for every topic (a gap, never a repeat).
            for t in rec.next_seq:
                rec.next_seq[t] += len(bad)
            # Set aside as evidence; what could be read is written again (compaction).
            why = "; ".join(bad) + "; every other line was kept"
            rec.problems.append(_quarantine(directory, path, why))
            rec.quarantined = True
        elif first_n is not None:
            rec.segments.append(_Segment(path, first_n, last_n, path.stat().st_size))
        else:
            path.unlink()  # empty segment
    rec.pending = [seen[n] for n in sorted(seen)]
    rec.session += 1
    if rec.session > SEQ_MAX:
        raise OutboxError(f"{directory / STATE_FILE}: session counter exhausted")
    return rec


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

    def __init__(self, directory: Path, max_bytes: int, rec: _Recovered) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.retention_s, self._compact_acked = 0.0, -1  # acknowledged ones held (open())
        self._run_n = rec.next_n  # a run never appends to a segment of an earlier run
        self.session = rec.session
        self._next_seq = rec.next_seq
        self._next_n = rec.next_n
        self.acked_through = rec.acked_through
        self._saved_acked = rec.acked_through
        self._segments = rec.segments
        self._segment_max = max(64 * 1024, min(16 * 1024 * 1024, max_bytes // 8))
        self.pending: deque[Record] = deque(rec.pending)
        self.pending_bytes = sum(len(r.line) for r in self.pending)
        self._io = asyncio.Lock()  # one disk batch at a time
        self._unjournaled: list[Record] = []
        self._wake = asyncio.Event()
        self._journaled = asyncio.Event()
        self.changed = asyncio.Event()  # new journaled records (for the publisher)
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
            rec = await asyncio.to_thread(_recover, directory)
        except OSError as exc:
            raise OutboxError(f"{directory}: {exc.strerror or exc}") from None
        for problem in rec.problems:
            log.error("mqtt_outbox_damaged", problem=problem)
        self = cls(directory, max_bytes, rec)
        self.retention_s = retention_s
        try:
            state = self._state_bytes(self.acked_through)
            await asyncio.to_thread(_save_state, directory, state)
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
        """Allocate the next ``seq`` of ``topic`` (durable once a record holding it is)."""
        seq = self._next_seq[topic]
        if seq >= SEQ_MAX:  # the counter itself must stay a 64-bit value
            raise OverflowError(f"seq of {topic} exhausted")
        self._next_seq[topic] = seq + 1
        return seq

    def add(self, topic: str, payload: Payload) -> Record:
        """Queue a message (its payload already holds the ``seq`` from :meth:`next_seq`).
        Stream messages stay pending until acknowledged; a state message is the caller's
        to publish once journaled (:meth:`wait_journaled`) and to :meth:`ack`."""
        retained = topic not in STREAM_TOPICS
        n = self._next_n
        self._next_n += 1
        line, at = _line(n, topic, retained, orjson.dumps(payload))
        seq, session = payload["seq"], payload["session"]
        rec = Record(n, topic, retained, seq, session, line, at, time.monotonic_ns())
        self._unjournaled.append(rec)
        if not retained:
            self.pending.append(rec)
            self.pending_bytes += len(rec.line)
            if self.pending_bytes > max(self.max_bytes, self._thin_again_at):
                self._thin()
        self._wake.set()
        return rec

    async def wait_journaled(self, rec: Record) -> None:
        while not rec.journaled:
            self._journaled.clear()
            await self._journaled.wait()

    def unsent(self) -> Iterator[Record]:
        """Pending stream records that are journaled (publishable), in order."""
        for rec in self.pending:
            if not rec.journaled:
                return
            if not rec.done:
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
        """Journal new records in groups (write + fsync in a thread), delete segments
        that are fully acknowledged, and save the state now and then. Ends at close."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._closing and not self._unjournaled:
                return

    async def _flush(self) -> None:
        async with self._io:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
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
                for rec in batch:
                    rec.journaled = True
                self._journaled.set()
                self.changed.set()
        due = time.monotonic() - self._last_save >= STATE_SAVE_INTERVAL_S
        if self.acked_through != self._saved_acked and (due or self._closing):
            with contextlib.suppress(OSError):
                acked = self.acked_through
                await _uncancellable(self._retire, acked, self._state_bytes(acked))

    def _write(self, batch: list[Record], live: list[Record] | None, state: bytes) -> None:
        if live is not None:
            self._compact_now(live, state)
        if not batch:
            return
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.size >= self._segment_max or seg.last_n < self._run_n:
            path = self.directory / f"outbox-{batch[0].n:016d}.jsonl"
            seg = _Segment(path, batch[0].n, batch[0].n, 0)
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
        _save_state(self.directory, state)
        old = list(self._segments)
        held = self.retention_s > 0
        self._segments = [s for s in old if held and s.last_n <= self._compact_acked]
        if live:
            path = self.directory / f"outbox-{live[0].n:016d}.jsonl"
            write_atomic(path, b"".join(r.line for r in live))
            self._segments.append(_Segment(path, live[0].n, live[-1].n, path.stat().st_size))
        keep = {s.path for s in self._segments}
        for seg in old:
            if seg.path not in keep:
                seg.path.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def _retire(self, acked: int, state: bytes) -> None:
        """Save the state, then delete segments that hold nothing unacknowledged (the
        current one too: the next batch starts a fresh segment) once held
        ``retention_s``, or beyond ``max_bytes`` of them, oldest first."""
        _save_state(self.directory, state)
        self._saved_acked = acked
        self._last_save = time.monotonic()
        for _ in range(retired(self._segments, acked, self.retention_s, self.max_bytes)):
            self._segments.pop(0).path.unlink(missing_ok=True)

    def _state_bytes(self, acked: int) -> bytes:
        state = {
            "session": self.session,
            "next_n": self._next_n,
            "acked_through": acked,
            "next_seq": dict(self._next_seq),
        }
        return orjson.dumps(state, option=orjson.OPT_INDENT_2)

    async def close(self) -> None:
        """Journal what is left, save the state. Pending records stay for the next run."""
        self._closing = True
        self._wake.set()
        async with self._io:
            await self._flush_locked()
            try:
                acked = self.acked_through
                await _uncancellable(self._retire, acked, self._state_bytes(acked))
            except OSError as exc:
                log.error("mqtt_outbox_state_not_saved", error=str(exc))  # noqa: TRY400
