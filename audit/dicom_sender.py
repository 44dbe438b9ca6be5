"""The DICOM sink's hand-off worker: from the outbox to each destination, every attempt on
the record.

What it does, in one task of the sink's own (``Sink.run``), never on the daemon's path:

1. **Build**: a delivery to hand off (its termination, or a physicist's sign-off) is first
   a *pending* file (audit/dicom_outbox.py), written and fsync'd at once. At the next wake
   (a checkpoint: the record is then covered) its instances are built from the log
   (``builder``, in a worker thread) and each (instance, destination) becomes an outbox
   entry, on disk, recorded ``queued``; then the pending file goes. A build that fails is
   recorded once (``build_failed``) and tried again with backoff.
2. **Send**: per destination, the entries due go in one association (``transfer.store``,
   blocking, in a daemon thread of its own: kernel/threads.py), bounded by
   ``timeout_s x (instances + 2)``; a peer that does not answer is recorded
   ``unreachable`` and its thread abandoned. No second association is opened to a
   destination while an abandoned one is still running (a hung peer gets one at a time).
   Each instance's outcome is recorded (``stored``, ``warning``, ``failed``, ``refused``,
   ``unreachable``; ``status``, ``detail``, ``attempt``). Stored (or warning): the entry
   leaves the outbox, or, where the destination asks for Storage Commitment, waits in
   stage ``commit``; anything else: retried.
3. **Commit**: entries in stage ``commit`` are asked for in one N-ACTION
   (``transfer.commit``, bounded the same way). ``committed``: the entry leaves.
   ``commit_failed`` with the receiver's Failure Reason in ``status`` (0x0112: no such
   instance): stored again (the same SOP Instance UID) and asked again. No answer: asked
   again later (``commit_failed``, status null).
4. **Retry**: each destination has a capped jittered backoff (kernel/backoff.py): after a
   failed attempt the next is ``retry_initial_s`` later, doubling up to ``retry_max_s``;
   a success resets it. A restart finds the outbox as it was and sends at once.
5. **Alarm**: an entry not handed off ``alarm_after_s`` after it was queued (or a
   pending delivery not built by then) is recorded ``overdue`` once and raises a
   ``critical`` notice (MQTT ``events``, the dashboard); the retries go on.

Order of the record and the outbox: an outcome is recorded first; the entry is removed
only if the record took it (``record`` returned True). A daemon stopping (nothing more
may be recorded) or a SIGKILL between the store and the removal leaves the entry, which
is sent again at the next start: the same SOP Instance UID (the builder's UIDs are
derived from the log), which a receiver holds once, and which is recorded then.

Nothing here holds patient data in memory longer than a send: the instances are read
from their files for each attempt; no record, log line or notice holds more than the
delivery id (a pseudonym), the destination name and the SOP Instance UID.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import structlog

from iortd.audit.dicom_outbox import Entry, Outbox, OutboxError, Pending
from iortd.kernel.backoff import Backoff
from iortd.kernel.threads import in_daemon_thread

__all__ = ["Built", "HandoffSettings", "HandoffWorker", "Transfer"]

log = structlog.get_logger("iortd.dicom")

ENTRY_TYPE: Final = "dicom_handoff"
BUILD_TIMEOUT_S: Final = 300.0
MAX_WAIT_S: Final = 60.0  # the loop looks at the overdue bound at least this often
DETAIL_MAX: Final = 200
CLOSE_GRACE_S: Final = 1.0
_STORED: Final = frozenset({"stored", "warning"})


class Peer(Protocol):
    """A destination (audit/dicom_net.py's ``Destination``)."""

    @property
    def name(self) -> str: ...
    @property
    def commitment(self) -> bool: ...
    @property
    def timeout_s(self) -> float: ...


class StoreResult(Protocol):
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def status(self) -> int | None: ...
    @property
    def detail(self) -> str: ...


class CommitResult(Protocol):
    @property
    def committed(self) -> tuple[str, ...]: ...
    @property
    def failed(self) -> tuple[tuple[str, int], ...]: ...
    @property
    def detail(self) -> str: ...


class Transfer(Protocol):
    """The network, blocking (run in a thread): the sink's adapter over dicom_net."""

    def store(self, dest: Any, instances: Sequence[tuple[str, bytes]]) -> Sequence[StoreResult]:
        """One association; ``instances`` are (SOP Instance UID, file bytes)."""
        ...

    def commit(self, dest: Any, refs: Sequence[tuple[str, str]]) -> CommitResult:
        """One N-ACTION for (SOP Class UID, SOP Instance UID) pairs, and its answer."""
        ...


@dataclass(frozen=True, slots=True)
class Built:
    """One instance built from the log: what it is, its UIDs, its DICOM file bytes."""

    what: str
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes


Builder = Callable[[str], Sequence[Built]]  # delivery id -> its instances (blocking)
Record = Callable[[str, Mapping[str, Any]], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class HandoffSettings:
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0
    alarm_after_s: float = 3600.0


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until ``event`` (then cleared) or ``timeout_s``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    event.clear()


def _clean(text: str) -> str:
    """At most DETAIL_MAX printable ASCII characters (a peer's words, never trusted)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:DETAIL_MAX]


@dataclass(slots=True)
class _Dest:
    peer: Any
    backoff: Backoff
    due: float = 0.0  # monotonic
    idle: threading.Event | None = None  # set when its last thread has finished
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class HandoffWorker:
    def __init__(
        self,
        outbox: Outbox,
        destinations: Sequence[Any],
        transfer: Transfer,
        builder: Builder,
        record: Record,
        notice: Callable[[str, str], None],
        settings: HandoffSettings,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbox = outbox
        self._transfer = transfer
        self._builder = builder
        self._record = record
        self._notice = notice
        self._s = settings
        self._wall, self._mono = wall, mono
        self._dests = {
            d.name: _Dest(d, Backoff(settings.retry_initial_s, settings.retry_max_s))
            for d in destinations
        }
        self._entries: dict[tuple[str, str], Entry] = {}
        self._build = Backoff(settings.retry_initial_s, settings.retry_max_s)
        self._build_due = 0.0
        self._building = threading.Event()  # set while a build thread runs (one at a time)
        self._wake = asyncio.Event()
        self._closing = False
        self._loops: list[asyncio.Task[None]] = []

    # ---- the sink's side ----------------------------------------------------------------

    async def open(self) -> None:
        """Directories made (or closed), the outbox loaded (raises OutboxError)."""
        names = list(self._dests)
        await asyncio.to_thread(self._outbox.open, names)
        for e in await asyncio.to_thread(self._outbox.load, names):
            self._entries[(e.destination, e.sop_instance_uid)] = e
        log.info("dicom_outbox_loaded", entries=len(self._entries))
        for name, count in (await asyncio.to_thread(self._outbox.orphans, names)).items():
            # Entries for a destination the config no longer names: never sent, never
            # deleted by iortd (they may be the only copy of a hand-off), and they hold the
            # real Patient ID, so someone must decide.
            log.error("dicom_outbox_orphaned", destination=name, entries=count)
            self._notice(
                "critical",
                f"DICOM hand-off: {count} instance(s) queued for destination {name!r}, "
                "which the config no longer names, are neither sent nor deleted: resend "
                "them with iort-audit send or remove that outbox directory",
            )

    async def queue_delivery(self, delivery_id: str, trigger: str) -> None:
        """On disk before returning: this delivery is to be handed off."""
        p = Pending(delivery_id, trigger, self._wall())
        await asyncio.to_thread(self._outbox.add_pending, p)
        log.info("dicom_handoff_pending", delivery=delivery_id, trigger=trigger)

    def wake(self) -> None:
        """Look now (a checkpoint: what is pending can be built). What failed to build
        waits for its backoff still: a log that does not verify is not verified again at
        every checkpoint."""
        self._wake.set()

    async def aclose(self) -> None:
        """Stop: what is under way gets ``CLOSE_GRACE_S`` to finish (a record, an outbox
        update); then the loops are cancelled, abandoning a thread still waiting for a
        peer or building (each step is crash-safe: an entry not yet updated is sent again,
        as the same instance, at the next start)."""
        self._closing = True
        self._wake.set()
        for d in self._dests.values():
            d.wake.set()
        loops = [t for t in self._loops if not t.done()]
        if loops:
            _, late = await asyncio.wait(loops, timeout=CLOSE_GRACE_S)
            for t in late:
                t.cancel(msg="dicom sink closing")

    async def run(self) -> None:
        """Build, send, commit and retry until :meth:`aclose`: one loop for building and
        the overdue check, one per destination (a slow peer delays only itself). Never
        raises (but cancellation): a failing round is logged and the next one comes."""
        if self._closing:
            return
        async with asyncio.TaskGroup() as tg:
            self._loops = [tg.create_task(self._build_loop(), name="dicom-build")]
            self._loops += [
                tg.create_task(self._dest_loop(d), name=f"dicom:{d.peer.name}")
                for d in self._dests.values()
            ]

    async def _build_loop(self) -> None:
        while not self._closing:
            try:
                await self.build_pending()
            except Exception:
                log.exception("dicom_handoff_round_failed", part="build")
            wait = MAX_WAIT_S
            if self._pending_known:
                wait = min(wait, self._build_due - self._mono())
            await _wait(self._wake, max(0.01, wait))

    async def _dest_loop(self, d: _Dest) -> None:
        while not self._closing:
            try:
                if self._ready(d):
                    await self._attempt(d)
                # Here, not in another task: only this loop writes this destination's
                # entries (an alarm flag written beside a removal would resurrect one).
                await self._check_overdue(d.peer.name)
            except Exception:
                log.exception("dicom_handoff_round_failed", destination=d.peer.name)
                d.due = self._mono() + d.backoff.next_delay()
            wait = min(MAX_WAIT_S, max(0.01, self._until_overdue(d.peer.name)))
            if self._has_work(d.peer.name) and (d.idle is None or d.idle.is_set()):
                wait = min(wait, max(0.01, d.due - self._mono()))
            await _wait(d.wake, wait)

    _pending_known = True  # there may be pending deliveries (as of the last look)

    def _until_overdue(self, dest: str) -> float:
        """Seconds until the destination's next entry not yet alarmed becomes overdue."""
        bound = self._s.alarm_after_s
        ends = [
            e.queued_at + bound for k, e in self._entries.items() if k[0] == dest and not e.alarmed
        ]
        return min(ends, default=self._wall() + MAX_WAIT_S) - self._wall()

    def _has_work(self, dest: str) -> bool:
        return any(k[0] == dest for k in self._entries)

    def _ready(self, d: _Dest) -> bool:
        """Its time has come, it has work, and no abandoned attempt is still running."""
        idle = d.idle is None or d.idle.is_set()
        return d.due <= self._mono() and self._has_work(d.peer.name) and idle

    # ---- 1. build ----------------------------------------------------------------------

    async def build_pending(self) -> None:
        """Turn pending deliveries into outbox entries: the new ones at once, those that
        failed before once the build backoff has passed."""
        retry = self._mono() >= self._build_due
        pending = await asyncio.to_thread(self._outbox.pending)
        self._pending_known = bool(pending)
        failed = False
        for p in pending:
            if p.failures and not retry:
                continue
            if self._closing:
                return
            if self._building.is_set():  # an abandoned build still runs: never a second
                log.warning("dicom_build_still_running", delivery=p.delivery_id)
                failed = True
                break
            self._building.set()
            try:
                async with asyncio.timeout(BUILD_TIMEOUT_S):
                    built = await in_daemon_thread(
                        self._build_one, p.delivery_id, name="dicom-build"
                    )
            except Exception as exc:
                failed = True
                await self._build_failed(p, exc)
                continue
            await self._enqueue(p, built)
        if failed:  # the backoff grows while builds fail
            self._build_due = self._mono() + self._build.next_delay()
        elif retry:
            self._build.reset()

    def _build_one(self, delivery_id: str) -> Sequence[Built]:
        """In the build thread: clears the flag when the build ends, also one whose wait
        was abandoned (a build verifies the whole log: two at once would only compete
        with the daemon's own loop for the interpreter)."""
        try:
            return self._builder(delivery_id)
        finally:
            self._building.clear()

    async def _build_failed(self, p: Pending, exc: Exception) -> None:
        why = "took too long" if isinstance(exc, TimeoutError) else str(exc)
        log.warning("dicom_build_failed", delivery=p.delivery_id, error=why)
        if p.failures == 0:  # once, not at every try
            for name in self._dests:
                await self._say(p.delivery_id, name, None, "build_failed", None, why, 0)
        alarmed = p.alarmed
        age_min = (self._wall() - p.since) / 60
        if not alarmed and age_min * 60 >= self._s.alarm_after_s:
            said = f"not built after {age_min:.0f} min: {why}"
            for name in self._dests:
                alarmed = await self._say(p.delivery_id, name, None, "overdue", None, said, 0)
            self._notice(
                "critical",
                f"DICOM hand-off of delivery {p.delivery_id}: its instances could not be "
                f"built from the log for {age_min:.0f} min; still retrying (iortd's "
                "operational log says why)",
            )
        p2 = replace(p, failures=p.failures + 1, alarmed=alarmed)
        await asyncio.to_thread(self._outbox.update_pending, p2)

    async def _enqueue(self, p: Pending, built: Sequence[Built]) -> None:
        now = self._wall()
        for b in built:
            for name in self._dests:
                e = Entry(name, b.sop_instance_uid, b.sop_class_uid, b.what, p.delivery_id, now)
                if await asyncio.to_thread(self._outbox.add, e, b.data):
                    self._entries[(name, e.sop_instance_uid)] = e
                    await self._say_entry(e, "queued", None, "", 0)
        await asyncio.to_thread(self._outbox.remove_pending, p)
        for d in self._dests.values():
            d.due = min(d.due, self._mono())
            d.wake.set()

    # ---- 2./3. send and commit ---------------------------------------------------------

    async def attempt_due(self) -> None:
        """One attempt for each destination whose time has come, all at once (what the
        destination loops do, each at its own pace)."""
        due = [d for d in self._dests.values() if self._ready(d)]
        if due:
            async with asyncio.TaskGroup() as tg:
                for d in due:
                    tg.create_task(self._attempt(d), name=f"dicom:{d.peer.name}")

    async def _attempt(self, d: _Dest) -> None:
        name = d.peer.name
        ok = True
        to_store = [e for k, e in self._entries.items() if k[0] == name and e.stage == "store"]
        if to_store:
            ok = await self._store(d, to_store)
        to_commit = [e for k, e in self._entries.items() if k[0] == name and e.stage == "commit"]
        if to_commit and not self._closing:
            ok = await self._commit(d, to_commit) and ok
        if ok:
            d.backoff.reset()
            d.due = self._mono()
        else:
            d.due = self._mono() + d.backoff.next_delay()

    async def _in_thread(self, d: _Dest, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a daemon thread; ``d.idle`` is set when it has finished (also
        after the caller stopped waiting for it)."""
        idle = d.idle = threading.Event()
        loop = asyncio.get_running_loop()

        def work() -> Any:
            try:
                return fn(*args)
            finally:
                idle.set()
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(d.wake.set)

        return await in_daemon_thread(work, name=f"dicom-{d.peer.name}")

    async def _store(self, d: _Dest, entries: list[Entry]) -> bool:
        bound = d.peer.timeout_s * (len(entries) + 2)
        results: dict[str, tuple[str, int | None, str]] = {}
        # The attempt is counted on disk before it is made: after a crash mid-attempt the
        # next one has the next number (every attempt number in the record is unique).
        counted = []
        for e in entries:
            e2 = replace(e, attempts=e.attempts + 1)
            await asyncio.to_thread(self._outbox.update, e2)
            self._entries[(e.destination, e.sop_instance_uid)] = e2
            counted.append(e2)
        entries = counted
        try:
            datas = [
                (e.sop_instance_uid, await asyncio.to_thread(self._outbox.instance, e))
                for e in entries
            ]
            async with asyncio.timeout(bound):
                got = await self._in_thread(d, self._transfer.store, d.peer, datas)
            for r in got:
                results[r.sop_instance_uid] = (r.outcome, r.status, r.detail)
        except TimeoutError:
            results = {}
            missing = f"no answer within {bound:.0f} s"
        except OutboxError as exc:
            missing = f"the outbox entry cannot be read: {exc}"
        except Exception as exc:  # the network layer's bug: recorded, retried
            log.exception("dicom_store_failed", destination=d.peer.name)
            missing = f"sender error: {type(exc).__name__}"
        else:
            missing = "no outcome for this instance"
        all_ok = True
        for e in entries:
            outcome, status, detail = results.get(
                e.sop_instance_uid, ("unreachable", None, missing)
            )
            if outcome in _STORED:
                stage = "commit" if d.peer.commitment else "done"
                await self._settle(e, outcome, status, detail, stage)
            else:
                all_ok = False
                await self._settle(e, outcome, status, detail, "store")
        return all_ok

    async def _commit(self, d: _Dest, entries: list[Entry]) -> bool:
        bound = d.peer.timeout_s * 2 + 5
        refs = [(e.sop_class_uid, e.sop_instance_uid) for e in entries]
        committed: set[str] = set()
        failed: dict[str, int] = {}
        try:
            async with asyncio.timeout(bound):
                res = await self._in_thread(d, self._transfer.commit, d.peer, refs)
            committed, failed, detail = set(res.committed), dict(res.failed), res.detail
        except TimeoutError:
            detail = f"no commitment answer within {bound:.0f} s"
        except Exception as exc:
            log.exception("dicom_commit_failed", destination=d.peer.name)
            detail = f"sender error: {type(exc).__name__}"
        all_ok = True
        for e in entries:
            uid = e.sop_instance_uid
            if uid in committed:
                await self._settle(e, "committed", None, detail, "done")
            elif uid in failed:
                all_ok = False  # the receiver does not hold it: stored again
                await self._settle(e, "commit_failed", failed[uid], detail, "store")
            else:
                all_ok = False  # no word on it: asked again
                await self._settle(e, "commit_failed", None, detail or "no answer", "commit")
        return all_ok

    async def _settle(
        self, e: Entry, outcome: str, status: int | None, detail: str, stage: str
    ) -> None:
        """Record the outcome, then move the entry on (removed only once recorded)."""
        recorded = await self._say_entry(e, outcome, status, detail, e.attempts)
        key = (e.destination, e.sop_instance_uid)
        if stage == "done" and recorded:
            await asyncio.to_thread(self._outbox.remove, e)
            self._entries.pop(key, None)
            return
        if stage == "done":  # not on the record: sent (and recorded) again next time
            stage = e.stage
        e2 = replace(e, stage=stage)
        await asyncio.to_thread(self._outbox.update, e2)
        self._entries[key] = e2

    # ---- 5. overdue --------------------------------------------------------------------

    async def _check_overdue(self, dest: str) -> None:
        now = self._wall()
        for key, e in list(self._entries.items()):
            if key[0] != dest or e.alarmed or now - e.queued_at < self._s.alarm_after_s:
                continue
            minutes = (now - e.queued_at) / 60
            detail = f"not handed off after {minutes:.0f} min ({e.attempts} attempts)"
            if await self._say_entry(e, "overdue", None, detail, e.attempts):
                e2 = replace(e, alarmed=True)
                await asyncio.to_thread(self._outbox.update, e2)
                self._entries[key] = e2
                self._notice(
                    "critical",
                    f"DICOM hand-off of delivery {e.delivery_id} ({e.what}) to {e.destination} "
                    f"not handed off after {minutes:.0f} min ({e.attempts} attempts); "
                    "still retrying: check the destination (iortd's operational log)",
                )

    # ---- the record ---------------------------------------------------------------------

    async def _say_entry(
        self, e: Entry, outcome: str, status: int | None, detail: str, attempt: int
    ) -> bool:
        return await self._say(e.delivery_id, e.destination, e, outcome, status, detail, attempt)

    async def _say(
        self,
        delivery_id: str,
        destination: str,
        e: Entry | None,
        outcome: str,
        status: int | None,
        detail: str,
        attempt: int,
    ) -> bool:
        data = {
            "delivery_id": delivery_id,
            "destination": destination,
            "what": None if e is None else e.what,
            "sop_instance_uid": None if e is None else e.sop_instance_uid,
            "outcome": outcome,
            # a DIMSE status or a Failure Reason is 16 bits; anything else is not one
            "status": status if isinstance(status, int) and 0 <= status <= 0xFFFF else None,
            "detail": _clean(detail),
            "attempt": attempt,
        }
        log.info(
            "dicom_handoff",
            **{k: v for k, v in data.items() if k != "delivery_id"},
            delivery=delivery_id,
        )
        try:
            return await self._record(ENTRY_TYPE, data)
        except Exception:
            log.exception("dicom_handoff_not_recorded")
            return False
